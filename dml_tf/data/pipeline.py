"""tf.data pipelines over in-memory uint8 images: shuffle, augment, normalise, batch.

Randomness is seeded and stateless: the shuffle and `tf.data.Dataset.random` (which
supplies one augmentation seed per batch) both start from `seed` and draw a new sequence
for every epoch (every new iterator). Two pipelines built with the same seed, under the
same global TensorFlow seed, give the same batches epoch by epoch.
"""

import tensorflow as tf

from dml_tf.data import augment as augment_lib
from dml_tf.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE
PADDING = 4  # paper Sec. 4.1: 4-pixel reflection padding, then a random 32x32 crop.


def normalize(images, mean, std):
    """(images - mean) / std per channel, as float32.

    Usable on any leading shape, in tf.data and in serving signatures (uint8 inputs).

    Args:
        images: [..., C] tensor, any real or integer dtype (typically uint8).
        mean: C floats, pixel units.
        std: C floats, pixel units, all > 0.

    Returns:
        float32 tensor of the images' shape.
    """
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (tf.cast(images, tf.float32) - mean) / std


def _check(images, labels, mean, std, batch_size, flag):
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    if batch_size < 1:
        raise UserError(f"{flag}={batch_size} must be at least 1.")
    if len(mean) != images.shape[-1] or len(std) != images.shape[-1]:
        raise ValueError(f"mean/std need {images.shape[-1]} channels, got {mean} / {std}.")
    if min(std) <= 0:
        raise ValueError(f"std must be positive in every channel, got {std}.")


def train_dataset(images, labels, mean, std, batch_size, seed, augment=True, views=1,
                  flip=True):
    """The training pipeline: whole-set shuffle, pad-crop-flip, normalise, full batches.

    Augmentation runs on whole batches (`augment.pad_crop_flip_batch`), each image with its
    own window and flip; it measured about twice the throughput of mapping the per-image
    ops before batching on 2 CPU cores.

    Args:
        images: uint8 [N, H, W, 3] array.
        labels: int64 [N] array.
        mean: 3 floats, per-channel mean in pixel units.
        std: 3 floats, per-channel std in pixel units.
        batch_size: examples per batch; the last partial batch is dropped, so every batch
            has the static shape [batch_size, H, W, 3] and a train step compiles once.
        seed: int seed of the shuffle and of the augmentation.
        augment: whether to pad-crop-flip (False: shuffle and normalise only).
        flip: with augment, whether to also mirror half of the images horizontally.
        views: number of independently augmented copies of each batch (KDCL's
            per-peer augmentation); with views > 1 the images are a tuple of `views` tensors.

    Returns:
        A `tf.data.Dataset` of (float32 [B, H, W, 3] images, or a tuple of them, int64 [B]).

    Raises:
        UserError: the batch size is not positive or exceeds the training set.
    """
    _check(images, labels, mean, std, batch_size, "--batch_size")
    if batch_size > len(images):
        raise UserError(f"--batch_size={batch_size} is larger than the {len(images)} training "
                        f"images, so an epoch would have no full batch; lower --batch_size.")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}.")
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    # One [2] int64 seed per batch, a new deterministic stream each epoch.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds))

    def view(x, batch_seed, k):
        if augment:
            x = augment_lib.pad_crop_flip_batch(
                x, tf.random.experimental.stateless_fold_in(batch_seed, k), padding=PADDING,
                flip=flip)
        return normalize(x, mean, std)

    def transform(batch, batch_seed):
        x, y = batch
        y = tf.cast(y, tf.int64)
        if views == 1:
            return view(x, batch_seed, 0), y
        return tuple(view(x, batch_seed, k) for k in range(views)), y

    ds = ds.map(transform, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def eval_dataset(images, labels, mean, std, batch_size):
    """The evaluation pipeline: normalise and batch, in order, keeping the last partial batch.

    Args:
        images: uint8 [N, H, W, 3] array.
        labels: int64 [N] array.
        mean: 3 floats, per-channel mean in pixel units.
        std: 3 floats, per-channel std in pixel units.
        batch_size: examples per batch.

    Returns:
        A `tf.data.Dataset` of (float32 [B, H, W, 3], int64 [B]) covering every example once.
    """
    _check(images, labels, mean, std, batch_size, "--eval_batch_size")
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    ds = ds.map(lambda x, y: (normalize(x, mean, std), tf.cast(y, tf.int64)),
                num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
