"""dml_tf.losses against numpy formulas."""

import numpy as np
import pytest
import tensorflow as tf

from dml_tf import losses


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_kl_divergence_matches_numpy(rng):
    target = _softmax(rng.normal(size=(6, 5)))
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    q = _softmax(logits.astype(np.float64))
    expected = np.mean(np.sum(target * (np.log(target) - np.log(q)), axis=1))
    got = losses.kl_divergence(tf.constant(target, tf.float32), tf.constant(logits))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_kl_divergence_with_zero_target_entries_is_cross_entropy_minus_nothing(rng):
    labels = np.array([0, 3, 1])
    onehot = np.eye(4)[labels]
    logits = rng.normal(size=(3, 4)).astype(np.float32)
    expected = np.mean(-np.log(_softmax(logits.astype(np.float64))[np.arange(3), labels]))
    got = losses.kl_divergence(tf.constant(onehot, tf.float32), tf.constant(logits))
    assert np.isfinite(got.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_kl_of_a_distribution_with_itself_is_zero(rng):
    logits = rng.normal(size=(4, 7)).astype(np.float32)
    got = losses.kl_divergence(tf.nn.softmax(logits), tf.constant(logits))
    assert abs(float(got)) < 1e-6


def test_cross_entropy_matches_numpy_with_smoothing_and_mask(rng):
    logits = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0])
    mask = np.array([1, 0, 1, 1, 0], np.float32)
    eps = 0.1
    targets = np.eye(3)[labels] * (1 - eps) + eps / 3
    per_example = -np.sum(targets * np.log(_softmax(logits.astype(np.float64))), axis=1)
    expected = np.sum(per_example * mask) / mask.sum()
    got = losses.cross_entropy(tf.constant(labels), tf.constant(logits), label_smoothing=eps,
                               mask=tf.constant(mask))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    plain = losses.cross_entropy(tf.constant(labels), tf.constant(logits))
    expected_plain = np.mean(-np.log(_softmax(logits.astype(np.float64))[np.arange(5), labels]))
    np.testing.assert_allclose(plain.numpy(), expected_plain, rtol=1e-5)


def test_cross_entropy_with_no_labelled_example_is_zero(rng):
    logits = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    got = losses.cross_entropy(tf.constant([0, 1, 2]), logits, mask=tf.zeros([3]))
    assert float(got) == 0.0


def test_entropy_matches_numpy(rng):
    logits = rng.normal(size=(4, 6)).astype(np.float32) * 3
    p = _softmax(logits.astype(np.float64))
    expected = np.mean(-np.sum(p * np.log(p), axis=1))
    np.testing.assert_allclose(losses.entropy(tf.constant(logits)).numpy(), expected, rtol=1e-5)
    uniform = losses.entropy(tf.zeros([2, 10]))
    np.testing.assert_allclose(uniform.numpy(), np.log(10), rtol=1e-6)


def test_l2_weight_penalty_decays_kernels_only(rng):
    kernel = tf.Variable(rng.normal(size=(3, 2)).astype(np.float32))
    bias = tf.Variable(rng.normal(size=(2,)).astype(np.float32))
    got = losses.l2_weight_penalty([kernel, bias], 5e-4)
    np.testing.assert_allclose(got.numpy(), 0.5 * 5e-4 * np.sum(kernel.numpy() ** 2), rtol=1e-6)
    assert float(losses.l2_weight_penalty([kernel], 0.0)) == 0.0
