"""tf.data pipelines: shapes, normalisation, augmentation, determinism per seed and epoch."""

import numpy as np
import pytest
import tensorflow as tf

from dml_tf.data import channel_stats, pipeline
from dml_tf.errors import UserError

N, B = 10, 4


@pytest.fixture
def data():
    """N distinct images; label i for image i, so outputs can be traced back to inputs."""
    x = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    y = np.arange(N, dtype=np.int64)
    mean, std = channel_stats(x)
    return x, y, mean, std


def reference(x, mean, std):
    return (x.astype(np.float64) - np.array(mean)) / np.array(std)


def epoch(ds):
    """One pass: (images [M,...], labels [M]) concatenated over the batches."""
    xs, ys = zip(*[(a.numpy(), b.numpy()) for a, b in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_train_batches_are_static_and_full(data):
    x, y, mean, std = data
    ds = pipeline.train_dataset(x, y, mean, std, batch_size=B, seed=0)
    images_spec, labels_spec = ds.element_spec
    assert images_spec.shape == (B, 32, 32, 3) and images_spec.dtype == tf.float32
    assert labels_spec.shape == (B,) and labels_spec.dtype == tf.int64
    batches = list(ds)
    assert len(batches) == N // B  # drop_remainder: the partial batch of 2 is dropped
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert len(set(labels)) == len(labels) == 8  # no example twice in an epoch


def test_eval_is_numpy_normalisation_in_order(data):
    x, y, mean, std = data
    ds = pipeline.eval_dataset(x, y, mean, std, batch_size=B)
    sizes = [b[0].shape[0] for b in ds]
    assert sizes == [4, 4, 2]  # the remainder is kept
    images, labels = epoch(ds)
    assert images.dtype == np.float32
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(images, reference(x, mean, std), rtol=1e-5, atol=1e-5)


def test_normalize_on_uint8_serving_inputs():
    images = tf.constant([[[[0, 128, 255]]]], tf.uint8)
    out = pipeline.normalize(images, (10.0, 20.0, 30.0), (2.0, 4.0, 5.0))
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy().ravel(), [-5.0, 27.0, 45.0])


def test_unaugmented_train_is_a_normalised_shuffle(data):
    x, y, mean, std = data
    ds = pipeline.train_dataset(x, y, mean, std, batch_size=5, seed=1, augment=False)
    images, labels = epoch(ds)
    assert sorted(labels) == list(range(N))
    np.testing.assert_allclose(images, reference(x[labels], mean, std), rtol=1e-5, atol=1e-5)
    orders = [tuple(epoch(ds)[1]) for _ in range(4)]
    assert len(set(orders + [tuple(labels)])) > 1  # reshuffled each epoch


def test_augmented_images_are_windows_of_the_padded_originals(data):
    x, y, mean, std = data
    ds = pipeline.train_dataset(x, y, mean, std, batch_size=5, seed=2)
    images, labels = epoch(ds)
    pixels = np.rint(images * np.array(std) + np.array(mean)).astype(np.int64)
    for image, label in zip(pixels, labels):
        padded = np.pad(x[label], ((4, 4), (4, 4), (0, 0)), mode="reflect").astype(np.int64)
        assert any(np.array_equal(image, padded[dy:dy + 32, dx:dx + 32][:, ::step])
                   for dy in range(9) for dx in range(9) for step in (1, -1))


def test_same_seed_same_batches_epoch_by_epoch(data):
    x, y, mean, std = data
    first = pipeline.train_dataset(x, y, mean, std, batch_size=B, seed=7)
    second = pipeline.train_dataset(x, y, mean, std, batch_size=B, seed=7)
    for _ in range(2):
        a, b = epoch(first), epoch(second)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    other = epoch(pipeline.train_dataset(x, y, mean, std, batch_size=B, seed=8))
    assert not np.array_equal(other[0], a[0])


def test_augmentation_differs_between_epochs(data):
    x, y, mean, std = data
    ds = pipeline.train_dataset(x, y, mean, std, batch_size=N, seed=3)
    (one, labels_one), (two, labels_two) = epoch(ds), epoch(ds)
    # Compare each example with itself: the shuffle also changes, so align by label.
    one, two = one[np.argsort(labels_one)], two[np.argsort(labels_two)]
    changed = [not np.array_equal(one[i], two[i]) for i in range(N)]
    assert sum(changed) >= N // 2


def test_views_are_independent_augmentations(data):
    x, y, mean, std = data
    ds = pipeline.train_dataset(x, y, mean, std, batch_size=N, seed=4, views=2)
    (view_1, view_2), labels = next(iter(ds))
    assert view_1.shape == view_2.shape == (N, 32, 32, 3) and labels.shape == (N,)
    assert not np.array_equal(view_1.numpy(), view_2.numpy())


def test_batch_larger_than_the_training_set(data):
    x, y, mean, std = data
    with pytest.raises(UserError, match="--batch_size"):
        pipeline.train_dataset(x, y, mean, std, batch_size=N + 1, seed=0)
    with pytest.raises(UserError, match="--eval_batch_size"):
        pipeline.eval_dataset(x, y, mean, std, batch_size=0)
