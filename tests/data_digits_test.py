"""The offline digits dataset, `channel_stats` and the `dml_tf.data.load` dispatcher."""

import math
from fractions import Fraction

import numpy as np
import pytest
from sklearn.datasets import load_digits

import dml_tf.data
from dml_tf.data import digits
from dml_tf.errors import UserError


@pytest.fixture(scope="module")
def data():
    return digits.load(seed=0)


def test_shapes_and_types(data):
    assert data.name == "digits" and data.num_classes == 10
    assert data.x_train.shape == (1437, 32, 32, 3) and data.x_test.shape == (360, 32, 32, 3)
    assert data.x_train.dtype == np.uint8 and data.x_test.dtype == np.uint8
    assert data.y_train.dtype == np.int64 and data.y_test.dtype == np.int64
    assert set(np.unique(data.y_train)) == set(range(10)) == set(np.unique(data.y_test))
    # Grey digits: the three channels are copies; the scale reaches the full 0..255.
    np.testing.assert_array_equal(data.x_train[..., 0], data.x_train[..., 2])
    assert data.x_train.min() == 0 and data.x_train.max() == 255


def bilinear_matrix(n_in, n_out):
    """Half-pixel-centre bilinear interpolation weights [n_out, n_in], edges clamped."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        weights[i, lo] += 1 - (src - lo)
        weights[i, hi] += src - lo
    return weights


def test_images_are_the_upsampled_digits():
    raw = load_digits()
    images = digits._to_images(raw.images[:50])
    a = bilinear_matrix(8, 32)
    expected = np.einsum("ij,njk,lk->nil", a, raw.images[:50] * 255 / 16, a)
    assert np.abs(images[..., 1].astype(np.float64) - expected).max() <= 0.5 + 1e-3


def test_split_is_seeded_and_stratified(data):
    again = digits.load(seed=0)
    np.testing.assert_array_equal(again.x_train, data.x_train)
    np.testing.assert_array_equal(again.y_test, data.y_test)
    other = digits.load(seed=1)
    assert not np.array_equal(other.y_train, data.y_train)
    all_counts = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(data.y_test, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1)
    np.testing.assert_array_equal(np.bincount(data.y_train, minlength=10) + test_counts,
                                  all_counts)


def test_mean_std_are_numpys_on_the_training_images(data):
    pixels = data.x_train.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(data.mean, pixels.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(data.std, pixels.std(axis=0), rtol=1e-10)
    assert all(isinstance(v, float) for v in data.mean + data.std)


def test_channel_stats_on_distinct_channels():
    x = np.random.default_rng(3).integers(0, 256, (5, 7, 6, 3), dtype=np.uint8)
    x[..., 1] //= 4
    mean, std = dml_tf.data.channel_stats(x)
    pixels = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-10)


def test_load_dispatches_to_digits():
    data = dml_tf.data.load("digits", seed=0)
    assert isinstance(data, dml_tf.data.ImageData) and data.x_train.shape[0] == 1437


def test_load_rejects_unknown_dataset():
    with pytest.raises(UserError, match="--dataset") as err:
        dml_tf.data.load("mnist")
    for name in dml_tf.data.DATASETS:
        assert name in str(err.value)


def test_image_data_rejects_wrong_types(data):
    with pytest.raises(ValueError):
        dml_tf.data.ImageData(data.x_train.astype(np.float32), data.y_train, data.x_test,
                              data.y_test, 10, data.mean, data.std, "digits")


def test_channel_stats_are_exact():
    # Values whose float moments round badly: a large count of 255s and a few 0s/1s.
    x = np.full((1000, 100, 1, 1), 255, dtype=np.uint8)
    x[0, :3] = 0
    x[1, :7] = 1
    n = x.size
    s1 = int(x.astype(np.int64).sum())
    s2 = int((x.astype(np.int64) ** 2).sum())
    mean, std = dml_tf.data.channel_stats(x)
    assert mean[0] == float(Fraction(s1, n))  # the exact mean, correctly rounded
    assert std[0] == math.sqrt(Fraction(n * s2 - s1 * s1, n * n))
