"""The cohort's update orders against hand-written numpy SGD updates (paper Algorithm 1)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dml_tf import methods
from dml_tf.cohort import Cohort
from dml_tf.errors import UserError

NUM_CLASSES = 3
LR = 0.5
WEIGHT_DECAY = 0.01


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _linear_model(seed, name):
    """images [B, 2, 2, 1] -> flatten -> dense logits: simple enough for a numpy gradient."""
    inputs = keras.Input((2, 2, 1))
    init = keras.initializers.RandomNormal(stddev=1.0, seed=seed)
    logits = keras.layers.Dense(NUM_CLASSES, kernel_initializer=init, bias_initializer=init)(
        keras.layers.Flatten()(inputs))
    return keras.Model(inputs, logits, name=name)


def _numpy_dml_grad(w, b, x, y, target, mask=None):
    """Gradient of CE(y, xW+b) + KL(target ‖ softmax(xW+b)) + wd/2‖W‖² (plain formulas).

    With a mask, the cross-entropy is averaged over the masked examples only and the KL
    over all (paper Sec. 3.4).
    """
    q = _softmax(x @ w + b)
    mask = np.ones(len(y)) if mask is None else mask
    dz = (q - np.eye(NUM_CLASSES)[y]) * mask[:, None] / mask.sum() + (q - target) / len(y)
    return x.T @ dz + WEIGHT_DECAY * w, dz.sum(axis=0)


def _setup(update):
    models = [_linear_model(1, "peer1"), _linear_model(2, "peer2")]
    optimizers = [keras.optimizers.SGD(LR) for _ in models]
    cohort = Cohort(models, optimizers, methods.get("dml"), update, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 2, 2, 1)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=6)
    params = [[v.numpy().astype(np.float64) for v in m.trainable_variables] for m in models]
    return cohort, images, labels, params


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_one_step_matches_hand_written_sgd(update):
    cohort, images, labels, params = _setup(update)
    x = images.reshape(6, -1).astype(np.float64)
    (w1, b1), (w2, b2) = params
    p1, p2 = _softmax(x @ w1 + b1), _softmax(x @ w2 + b2)
    g_w1, g_b1 = _numpy_dml_grad(w1, b1, x, labels, p2)
    new_w1, new_b1 = w1 - LR * g_w1, b1 - LR * g_b1
    if update == "sequential":
        # Algorithm 1 step 2: p1 recomputed with the updated Θ1 before Θ2 learns from it.
        p1 = _softmax(x @ new_w1 + new_b1)
    g_w2, g_b2 = _numpy_dml_grad(w2, b2, x, labels, p1)
    new_w2, new_b2 = w2 - LR * g_w2, b2 - LR * g_b2

    cohort.train_step(tf.constant(images), tf.constant(labels, tf.int64))
    got = [[v.numpy() for v in m.trainable_variables] for m in cohort.models]
    np.testing.assert_allclose(got[0][0], new_w1, atol=1e-5)
    np.testing.assert_allclose(got[0][1], new_b1, atol=1e-5)
    np.testing.assert_allclose(got[1][0], new_w2, atol=1e-5)
    np.testing.assert_allclose(got[1][1], new_b2, atol=1e-5)


def test_sequential_and_simultaneous_differ_only_for_later_peers():
    results = {}
    for update in ("sequential", "simultaneous"):
        cohort, images, labels, _ = _setup(update)
        cohort.train_step(tf.constant(images), tf.constant(labels, tf.int64))
        results[update] = [m.trainable_variables[0].numpy() for m in cohort.models]
    np.testing.assert_allclose(results["sequential"][0], results["simultaneous"][0], atol=1e-6)
    assert np.max(np.abs(results["sequential"][1] - results["simultaneous"][1])) > 1e-4


def test_step_is_traced_once_whatever_the_batch_size():
    cohort, images, labels, _ = _setup("sequential")
    for n in (6, 4, 6, 2):
        cohort.train_step(tf.constant(images[:n]), tf.constant(labels[:n], tf.int64))
    assert cohort.trace_count == 1


def _bn_model(name):
    inputs = keras.Input((4, 4, 2))
    h = keras.layers.Conv2D(3, 3, padding="same", kernel_initializer=keras.initializers.GlorotUniform(7))(inputs)
    h = keras.layers.BatchNormalization(momentum=0.5)(h)
    h = keras.layers.GlobalAveragePooling2D(name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, kernel_initializer="ones")(h), name=name)


def test_sequential_refresh_moves_batchnorm_statistics_once():
    images = np.random.default_rng(1).normal(1.0, 1.0, size=(8, 4, 4, 2)).astype(np.float32)
    labels = tf.constant([0, 1, 2, 0, 1, 2, 0, 1], tf.int64)
    models = [_bn_model("peer1"), _bn_model("peer2")]
    cohort = Cohort(models, [keras.optimizers.SGD(0.1) for _ in models], methods.get("dml"),
                    "sequential")
    conv = models[0].layers[1]
    pre_bn = conv(tf.constant(images)).numpy()  # peer 1's weights before the update
    cohort.train_step(tf.constant(images), labels)
    bn = models[0].layers[2]
    # One update with momentum 0.5 from the initial moving mean 0.
    expected = 0.5 * 0.0 + 0.5 * pre_bn.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected, atol=1e-5)


def test_predict_returns_per_peer_probabilities():
    cohort, images, _, params = _setup("simultaneous")
    probs = cohort.predict(tf.constant(images))
    x = images.reshape(6, -1)
    for (w, b), p in zip(params, probs):
        np.testing.assert_allclose(p.numpy(), _softmax(x @ w + b), atol=1e-5)


def test_mutual_method_needs_two_peers_and_update_is_checked():
    model = _linear_model(1, "peer1")
    with pytest.raises(UserError, match="at least 2"):
        Cohort([model], [keras.optimizers.SGD(0.1)], methods.get("dml"))
    with pytest.raises(UserError, match="update=.sideways."):
        Cohort([model], [keras.optimizers.SGD(0.1)], methods.get("independent"), "sideways")


def test_per_peer_views_and_label_mask_match_hand_written_sgd():
    cohort, images, labels, params = _setup("simultaneous")
    rng = np.random.default_rng(9)
    other_view = rng.normal(size=images.shape).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 0], np.float64)
    x1, x2 = images.reshape(6, -1).astype(np.float64), other_view.reshape(6, -1).astype(np.float64)
    (w1, b1), (w2, b2) = params
    # Each peer predicts on its own view; targets are the other peer's view's predictions.
    p1, p2 = _softmax(x1 @ w1 + b1), _softmax(x2 @ w2 + b2)
    g_w1, g_b1 = _numpy_dml_grad(w1, b1, x1, labels, p2, mask)
    g_w2, g_b2 = _numpy_dml_grad(w2, b2, x2, labels, p1, mask)
    cohort.train_step((tf.constant(images), tf.constant(other_view)),
                      tf.constant(labels, tf.int64), tf.constant(mask, tf.float32))
    got = [[v.numpy() for v in m.trainable_variables] for m in cohort.models]
    np.testing.assert_allclose(got[0][0], w1 - LR * g_w1, atol=1e-5)
    np.testing.assert_allclose(got[0][1], b1 - LR * g_b1, atol=1e-5)
    np.testing.assert_allclose(got[1][0], w2 - LR * g_w2, atol=1e-5)
    np.testing.assert_allclose(got[1][1], b2 - LR * g_b2, atol=1e-5)


class _FrozenFirst(methods.dml.DML):
    frozen_peers = (0,)


class _FeatureProbe(methods.independent.Independent):
    uses_features = True
    seen = None

    def losses(self, logits, labels, *, label_mask=None, features=None):
        type(self).seen = features
        return super().losses(logits, labels, label_mask=label_mask)


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_frozen_peer_is_never_updated(update):
    models = [_bn_model("peer1"), _bn_model("peer2")]
    before = [[v.numpy().copy() for v in m.variables] for m in models]
    cohort = Cohort(models, [keras.optimizers.SGD(0.1) for _ in models], _FrozenFirst(), update)
    images = np.random.default_rng(2).normal(size=(8, 4, 4, 2)).astype(np.float32)
    labels = tf.constant([0, 1, 2, 0, 1, 2, 0, 1], tf.int64)
    for _ in range(2):
        cohort.train_step(tf.constant(images), labels)
    for old, new in zip(before[0], models[0].variables):  # BN statistics included
        np.testing.assert_array_equal(old, new.numpy())
    assert any(np.abs(old - new.numpy()).max() > 0 for old, new in zip(before[1], models[1].variables))


def test_features_reach_the_method():
    models = [_bn_model("peer1"), _bn_model("peer2")]
    cohort = Cohort(models, [keras.optimizers.SGD(0.0) for _ in models], _FeatureProbe(),
                    "simultaneous")
    images = np.random.default_rng(2).normal(size=(8, 4, 4, 2)).astype(np.float32)
    cohort.train_step(tf.constant(images), tf.zeros([8], tf.int64))
    assert _FeatureProbe.seen is not None and len(_FeatureProbe.seen) == 2
    for feats in _FeatureProbe.seen:
        assert feats.shape.rank == 2 and feats.shape[-1] == 3  # symbolic inside the step
