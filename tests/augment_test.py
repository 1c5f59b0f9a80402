"""Augmentation: every crop is a window of numpy's reflect padding; seeds make it repeatable."""

import numpy as np
import pytest
import tensorflow as tf

from dml_tf.data import augment

P = 4


def distinct_image(h=32, w=32, seed=0):
    """A float image whose pixels are all different, so a window identifies its offset."""
    values = np.random.default_rng(seed).permutation(h * w * 3).astype(np.float32)
    return values.reshape(h, w, 3)


def windows(image, padding=P):
    """{window bytes: (dy, dx, flipped)} over the windows of numpy.pad(image, mode="reflect")."""
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)), mode="reflect")
    out = {}
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            window = padded[dy:dy + h, dx:dx + w]
            out[np.ascontiguousarray(window).tobytes()] = (dy, dx, False)
            out[np.ascontiguousarray(window[:, ::-1]).tobytes()] = (dy, dx, True)
    assert len(out) == 2 * (2 * padding + 1) ** 2, "windows of a distinct image are distinct"
    return out


def which_window(result, image_windows):
    """The (dy, dx, flipped) of the window `result` equals exactly; fails if it is none."""
    key = image_windows.get(np.ascontiguousarray(result).tobytes())
    assert key is not None, "the result is not a window of the reflect-padded image"
    return key


def test_tf_reflect_equals_numpy_reflect():
    image = distinct_image(6, 5)
    padded = tf.pad(image, [[P, P], [P, P], [0, 0]], mode="REFLECT").numpy()
    np.testing.assert_array_equal(
        padded, np.pad(image, ((P, P), (P, P), (0, 0)), mode="reflect"))


def test_every_offset_is_a_reflect_padded_window():
    image = distinct_image()
    all_windows = windows(image)
    crop = tf.function(lambda seed: augment.reflect_pad_random_crop(image, P, seed=seed))
    seen = set()
    for i in range(800):
        result = crop(tf.constant([i, 17], tf.int64)).numpy()
        key = which_window(result, all_windows)
        assert not key[2]  # the crop alone never flips
        seen.add(key[:2])
    assert seen == {(dy, dx) for dy in range(2 * P + 1) for dx in range(2 * P + 1)}


def test_same_seed_same_crop_different_seeds_differ():
    image = distinct_image()
    a = augment.reflect_pad_random_crop(image, seed=tf.constant([3, 4])).numpy()
    b = augment.reflect_pad_random_crop(image, seed=tf.constant([3, 4])).numpy()
    np.testing.assert_array_equal(a, b)
    others = [augment.reflect_pad_random_crop(image, seed=tf.constant([s, 4])).numpy()
              for s in range(5, 15)]
    assert any(not np.array_equal(a, o) for o in others)


def test_unseeded_crop_is_a_window_with_static_shape():
    image = tf.constant(distinct_image())
    result = augment.reflect_pad_random_crop(image)
    assert result.shape == (32, 32, 3) and result.dtype == tf.float32
    which_window(result.numpy(), windows(image.numpy()))


def test_crop_keeps_uint8_and_zero_padding_is_identity():
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    result = augment.reflect_pad_random_crop(image, padding=0, seed=tf.constant([1, 2]))
    assert result.dtype == tf.uint8
    np.testing.assert_array_equal(result.numpy(), image)
    with pytest.raises(ValueError):
        augment.reflect_pad_random_crop(image, padding=-1)


def test_flip_is_identity_or_mirror():
    image = distinct_image()
    outcomes = set()
    for i in range(20):
        result = augment.random_flip(image, seed=tf.constant([i, 0])).numpy()
        if np.array_equal(result, image):
            outcomes.add("same")
        else:
            np.testing.assert_array_equal(result, image[:, ::-1])
            outcomes.add("mirror")
    assert outcomes == {"same", "mirror"}
    again = augment.random_flip(image, seed=tf.constant([7, 0])).numpy()
    np.testing.assert_array_equal(again, augment.random_flip(image, seed=tf.constant([7, 0])))
    unseeded = augment.random_flip(image).numpy()
    assert np.array_equal(unseeded, image) or np.array_equal(unseeded, image[:, ::-1])


def test_batch_augmentation_is_per_example_windows_and_flips():
    images = np.stack([distinct_image(seed=k) for k in range(64)])
    all_windows = [windows(image) for image in images]
    augment_batch = tf.function(augment.pad_crop_flip_batch)
    seen = set()
    for i in range(40):
        result = augment_batch(images, tf.constant([i, 5], tf.int64))
        assert result.shape == images.shape
        keys = [which_window(r, w) for r, w in zip(result.numpy(), all_windows)]
        # Each example draws its own window: one batch holds many different ones.
        assert len(set(keys)) > 20
        seen.update(keys)
    assert seen == {(dy, dx, f) for dy in range(2 * P + 1) for dx in range(2 * P + 1)
                    for f in (False, True)}


def test_batch_augmentation_seeded_and_without_flip():
    images = np.random.default_rng(2).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    seed = tf.constant([9, 9])
    a = augment.pad_crop_flip_batch(images, seed)
    assert a.dtype == tf.uint8
    np.testing.assert_array_equal(a, augment.pad_crop_flip_batch(images, seed))
    assert not np.array_equal(a, augment.pad_crop_flip_batch(images, tf.constant([9, 10])))
    float_images = np.stack([distinct_image(seed=k) for k in range(16)])
    unflipped = augment.pad_crop_flip_batch(float_images, seed, flip=False).numpy()
    for r, image in zip(unflipped, float_images):
        assert not which_window(r, windows(image))[2]
