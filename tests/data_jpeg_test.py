"""The marker check of dml_tf.data.jpeg against TensorFlow's own JPEG decoder.

Every case is bytes as a dataset copy leaves them; the reference for "complete" is whether
`tf.io.decode_jpeg` decodes the bytes, which the check must agree with (bar a PNG, which
that decoder happens to read too, but the JPEG-only pipelines do not).
"""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dml_tf.data import jpeg

PIXELS = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
BASELINE = tf.io.encode_jpeg(PIXELS, quality=90).numpy()


def pillow(image, **options):
    out = io.BytesIO()
    Image.fromarray(image).save(out, "JPEG", **options)
    return out.getvalue()


def progressive():
    return pillow(PIXELS, progressive=True)


def with_exif_thumbnail():
    """BASELINE with an APP1 (Exif) segment holding a whole JPEG thumbnail, SOI to EOI."""
    thumbnail = tf.io.encode_jpeg(PIXELS[:8, :8]).numpy()
    payload = b"Exif\0\0" + thumbnail
    return BASELINE[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + \
        BASELINE[2:]


CASES = {  # name -> (bytes, expected code)
    "baseline": (BASELINE, jpeg.OK),
    "bytes after the end-of-image marker": (BASELINE + b"\0" * 64 + b"trailer", jpeg.OK),
    # Appended data with an FF DA pair that is no scan header (e.g. a video or a maker's
    # trailer): TensorFlow decodes the image, so it is not refused as truncated.
    "FF DA in appended data": (BASELINE + b"\x00\xff\xda\x12\x34 appended" * 3, jpeg.OK),
    "greyscale": (pillow(PIXELS[..., 0]), jpeg.OK),
    "greyscale, cut": (pillow(PIXELS[..., 0])[:-100], jpeg.TRUNCATED),
    "progressive": (progressive(), jpeg.OK),
    "exif thumbnail": (with_exif_thumbnail(), jpeg.OK),
    "cut in the scan": (BASELINE[:len(BASELINE) // 2], jpeg.TRUNCATED),
    "cut in the header": (BASELINE[:150], jpeg.TRUNCATED),
    "only the end-of-image marker missing": (BASELINE[:-2], jpeg.TRUNCATED),
    "progressive, cut": (progressive()[:-300], jpeg.TRUNCATED),
    "exif thumbnail, main image cut": (with_exif_thumbnail()[:-400], jpeg.TRUNCATED),
    "png": (tf.io.encode_png(PIXELS).numpy(), jpeg.PNG),
    "empty": (b"", jpeg.EMPTY),
    "html error page": (b"<html>404 Not Found</html>", jpeg.NOT_JPEG),
    "one byte": (b"\xff", jpeg.NOT_JPEG),
}


def decodes(data):
    try:
        tf.io.decode_jpeg(data, channels=3)
        return True
    except tf.errors.InvalidArgumentError:
        return False


@pytest.mark.parametrize("name", sorted(CASES))
def test_problem_agrees_with_the_decoder(name):
    data, expected = CASES[name]
    assert int(jpeg.problem(data)) == expected
    if expected != jpeg.PNG:
        assert decodes(data) == (expected == jpeg.OK)


def test_problem_keeps_the_shape_and_runs_in_tf_data():
    names = sorted(CASES)
    batch = np.array([CASES[n][0] for n in names], dtype=object).reshape(-1)
    expected = [CASES[n][1] for n in names]
    assert jpeg.problem(tf.constant(batch)).numpy().tolist() == expected
    grid = tf.reshape(tf.constant(batch[:4]), [2, 2])
    assert jpeg.problem(grid).shape == (2, 2)
    ds = tf.data.Dataset.from_tensor_slices(batch).map(jpeg.problem)
    assert [int(c) for c in ds] == expected
    assert jpeg.describe(jpeg.problem(CASES["png"][0])).numpy().decode() == \
        "is a PNG image, not a JPEG"
