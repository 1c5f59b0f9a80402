"""CIFAR augmentation (paper Sec. 4.1): 4-pixel reflection padding, random crop, flip.

`reflect_pad_random_crop` and `random_flip` work on one HWC image (the reference
definitions); `pad_crop_flip_batch` does the same to every image of a batch at once, each
with its own window and flip, and is what the training pipeline uses because it is about
twice as fast inside tf.data as mapping the per-image ops.

With a `seed` (an int32/int64 tensor of shape [2]) the ops are stateless: the same seed
gives the same result. Without one they use TensorFlow's stateful random ops.
"""

import tensorflow as tf


def _check_padding(padding):
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}.")


def reflect_pad_random_crop(image, padding=4, seed=None):
    """Reflect-pads one image by `padding` on each side and crops a random original-size window.

    Reflection does not repeat the edge pixel: it equals
    `numpy.pad(image, ((p, p), (p, p), (0, 0)), mode="reflect")`.

    Args:
        image: [H, W, C] tensor; H and W must exceed `padding`.
        padding: pixels added on each side.
        seed: optional shape-[2] int tensor for the stateless crop.

    Returns:
        [H, W, C] tensor of the image's dtype.
    """
    _check_padding(padding)
    image = tf.convert_to_tensor(image)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
    size = tf.shape(image)
    if seed is None:
        crop = tf.image.random_crop(padded, size)
    else:
        crop = tf.image.stateless_random_crop(padded, size, seed=seed)
    return tf.ensure_shape(crop, image.shape)


def random_flip(image, seed=None):
    """Flips one [H, W, C] image left-right with probability 1/2.

    Args:
        image: [H, W, C] tensor.
        seed: optional shape-[2] int tensor for the stateless flip.

    Returns:
        `image` or `image[:, ::-1]`.
    """
    if seed is None:
        return tf.image.random_flip_left_right(image)
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def pad_crop_flip_batch(images, seed, padding=4, flip=True):
    """`reflect_pad_random_crop` then `random_flip` on every image of a batch, vectorised.

    Each image gets its own uniformly drawn window offset (0..2*padding in each direction)
    and, if `flip`, its own fair coin for the horizontal flip: the same distribution as the
    per-image ops. The window and the flip are one gather along each axis, exact for any
    dtype.

    Args:
        images: [B, H, W, C] tensor.
        seed: shape-[2] int tensor; the output is a pure function of (images, seed).
        padding: pixels of reflection padding on each side.
        flip: whether to flip at random.

    Returns:
        [B, H, W, C] tensor of the images' dtype.
    """
    _check_padding(padding)
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]],
                    mode="REFLECT")
    offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offsets = tf.random.stateless_uniform([batch, 2], seed=offset_seed, minval=0,
                                          maxval=2 * padding + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(height)[None, :]
    cols = tf.range(width)[None, :]
    if flip:
        flipped = tf.random.stateless_uniform([batch, 1], seed=flip_seed, minval=0, maxval=2,
                                              dtype=tf.int32) > 0
        # Reading the window's columns backwards is the flip of the cropped image.
        cols = tf.where(flipped, width - 1 - cols, cols)
    cols = offsets[:, 1:] + cols
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    return tf.ensure_shape(out, images.shape)
