"""A cheap look at JPEG bytes before decoding them: what is wrong, if anything.

TensorFlow's decoders say "Invalid JPEG data or crop window" without naming the file or
record, and only when the image is decoded, which for an evaluation split comes after an
epoch of training. `problem` finds the usual faults of a dataset copy from the bytes'
markers alone, without decoding, so the loaders can name the file (Market-1501) or shard and
record (ImageNet) where they first read it:

* an empty file, or a record without image bytes;
* a PNG (or any other format) under a JPEG's name: it does not start with the JPEG
  start-of-image marker FF D8 FF (`tf.image.is_jpeg`);
* a truncated JPEG: no end-of-image marker (FF D9) follows its last start-of-scan header.
  TensorFlow refuses a JPEG without its end-of-image marker, but decodes one with bytes
  after it. Neither marker can occur inside the compressed data (its FF bytes are stuffed),
  so an embedded EXIF thumbnail's FF D9, before the main image's scan, does not hide the
  truncation of the main image. A scan header is matched whole (FF DA, its length 6 + 2n,
  its n = 1..4 components): an FF DA pair in data appended after the image (which
  TensorFlow ignores) is not taken for one, so such a file is not refused.

A JPEG damaged inside (flipped bits) passes and fails at decoding; a full decode finds it.
"""

import tensorflow as tf

OK, EMPTY, PNG, NOT_JPEG, TRUNCATED = range(5)
# What `problem`'s codes mean, as the end of a sentence whose subject is the file.
PROBLEMS = (
    "is a complete JPEG",
    "is empty (0 bytes)",
    "is a PNG image, not a JPEG",
    "is not a JPEG image",
    "is a truncated JPEG (it stops before its end-of-image marker)",
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_END_OF_IMAGE = b"\xff\xd9"
# Start-of-scan headers: FF DA, length 6 + 2n (2 bytes), n components (1..4).
_SCAN_HEADERS = tuple(b"\xff\xda" + (6 + 2 * n).to_bytes(2, "big") + bytes([n])
                      for n in range(1, 5))


def _ends_with_end_of_image(flat):
    """Whether an end-of-image marker follows the last scan header, for each string."""
    pieces = tf.strings.split(flat, sep=_END_OF_IMAGE)  # ragged [N, pieces]; a row has >= 1
    # What follows the last end-of-image marker: nothing, in most files.
    after_last = tf.gather(pieces.flat_values, pieces.row_limits() - 1)
    scan_after = tf.zeros_like(after_last, tf.bool)
    for header in _SCAN_HEADERS:
        scan_after |= tf.strings.split(after_last, sep=header).row_lengths() > 1
    return (pieces.row_lengths() > 1) & ~scan_after


def problem(contents):
    """What is wrong with each encoded image of `contents`, as indices into `PROBLEMS`.

    Vectorised string ops, no decoding: a batch of thousands of small files is one call.
    Works in eager code and inside tf.data / tf.function graphs.

    Args:
        contents: string tensor of any shape, each element the bytes of a file or record.

    Returns:
        int32 tensor of the same shape: `OK` (0), `EMPTY`, `PNG`, `NOT_JPEG` or `TRUNCATED`.
    """
    contents = tf.convert_to_tensor(contents, tf.string)
    flat = tf.reshape(contents, [-1])
    code = tf.where(_ends_with_end_of_image(flat), OK, TRUNCATED)
    code = tf.where(tf.image.is_jpeg(flat), code, NOT_JPEG)  # the FF D8 FF start-of-image
    code = tf.where(tf.equal(tf.strings.substr(flat, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE),
                    PNG, code)
    code = tf.where(tf.equal(tf.strings.length(flat), 0), EMPTY, code)
    return tf.reshape(code, tf.shape(contents))


def describe(code):
    """The words of a `problem` code, as a scalar string tensor (for assertion messages)."""
    return tf.gather(tf.constant(PROBLEMS), code)
