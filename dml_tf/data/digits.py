"""The offline quickstart dataset: scikit-learn's bundled handwritten digits.

1797 real 8x8 grey images (values 0..16, 10 classes) ship inside scikit-learn's wheel, so
they load without network. They are scaled to 0..255, upsampled bilinearly to 32x32 and
repeated over 3 channels so that every CIFAR network and pipeline runs on them unchanged.

Needs the quickstart extra (scikit-learn): pip install "dml_tf[quickstart]".
"""

import numpy as np

from dml_tf import errors
from dml_tf.data import ImageData

_MISSING = errors.missing_extra("dml_tf.data.digits", "quickstart", (("sklearn", "scikit-learn"),))
if _MISSING:
    raise _MISSING

SIZE = 32
TEST_FRACTION = 0.2


def _to_images(images_8x8):
    """float [N, 8, 8] in 0..16 -> uint8 [N, 32, 32, 3] in 0..255."""
    import tensorflow as tf

    scaled = images_8x8.astype(np.float32)[..., None] * (255.0 / 16.0)
    big = tf.image.resize(scaled, (SIZE, SIZE), method="bilinear").numpy()
    # Bilinear weights are convex, so values stay in 0..255 up to float rounding.
    big = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(big, 3, axis=-1))


def load(seed=0):
    """Loads the digits with a seeded, stratified 80/20 train/test split.

    Args:
        seed: `random_state` of the split; the same seed gives the same split.

    Returns:
        An `ImageData` named "digits": 1437 training and 360 test images, 10 classes.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = _to_images(digits.images)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=seed, stratify=labels)
    return ImageData.from_arrays(x_train, y_train, x_test, y_test, num_classes=10, name="digits",
                                 source="scikit-learn's digits", horizontal_flip=False)
