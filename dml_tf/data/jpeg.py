"""A cheap look at JPEG bytes before decoding them: what is wrong, if anything.

TensorFlow's decoders say "Invalid JPEG data or crop window" without naming the file or
record, and only when the image is decoded, which for an evaluation split comes after an
epoch of training. `problem` finds the usual faults of a dataset copy from the bytes'
markers alone, without decoding, so the loaders can name the file (Market-1501) or shard and
record (ImageNet) where they first read it:

* an empty file, or a record without image bytes;
* a PNG (or any other format) under a JPEG's name: it does not start with the JPEG
  start-of-image marker FF D8 FF (`tf.image.is_jpeg`);
* a truncated JPEG: the last of its start-of-scan (FF DA) and end-of-image (FF D9) markers
  is not an end-of-image. TensorFlow refuses a JPEG without its end-of-image marker, but
  decodes one with bytes after it; and neither marker can occur inside the compressed
  data (its FF bytes are stuffed), so an embedded EXIF thumbnail's FF D9 before the main
  image's scan does not hide the truncation of the main image.

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
_START_OF_SCAN, _END_OF_IMAGE = b"\xff\xda", b"\xff\xd9"


def _ends_with_end_of_image(flat):
    """Whether the last start-of-scan / end-of-image marker of each string is end-of-image."""
    pieces = tf.strings.split(flat, sep=_END_OF_IMAGE)  # ragged [N, pieces]; a row has >= 1
    after_last = tf.gather(pieces.flat_values, pieces.row_limits() - 1)
    scan_after = tf.strings.split(after_last, sep=_START_OF_SCAN).row_lengths() > 1
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
