"""The baselines kd, entropy_reg and dml_l2 (paper Tables 4 and 5) against numpy formulas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dml_tf import methods, nets
from dml_tf.cohort import Cohort
from dml_tf.errors import UserError


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p, q):
    """KL(p ‖ q), summed over classes, mean over the batch."""
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def _ce(z, y, mask=None):
    per_example = -np.log(_softmax(z)[np.arange(len(y)), y])
    mask = np.ones(len(y)) if mask is None else mask
    return float(np.sum(per_example * mask) / np.sum(mask))


def _entropy(z):
    p = _softmax(z)
    return float(np.mean(-np.sum(p * np.log(p), axis=1)))


@pytest.fixture
def batch():
    rng = np.random.default_rng(7)
    logits = [rng.normal(size=(6, 4)) * s for s in (2.0, 1.0, 0.7)]
    features = [rng.normal(size=(6, 5)) + k for k in range(3)]
    labels = rng.integers(0, 4, size=6)
    return logits, features, labels


def _run(method, logits, labels, features=None, mask=None):
    out = method.losses(
        [tf.constant(z, tf.float32) for z in logits], tf.constant(labels),
        label_mask=None if mask is None else tf.constant(mask, tf.float32),
        features=None if features is None else [tf.constant(f, tf.float32) for f in features])
    return [{k: float(v) for k, v in d.items()} for d in out]


def _gradients(method, logits, labels, features, k):
    """d(peer k's total)/d(every peer's logits and features); None where it does not reach."""
    zs = [tf.Variable(z, dtype=tf.float32) for z in logits]
    fs = [tf.Variable(f, dtype=tf.float32) for f in features]
    with tf.GradientTape() as tape:
        uses_features = getattr(method, "uses_features", False)
        total = method.losses(list(zs), tf.constant(labels),
                              features=list(fs) if uses_features else None)[k]["total"]
    return tape.gradient(total, (zs, fs))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_students_learn_from_the_teacher(batch, temperature):
    logits, _, labels = batch
    mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
    got = _run(methods.get("kd", temperature=temperature), logits, labels, mask=mask)
    t = temperature
    teacher = _softmax(logits[0] / t)
    assert set(got[0]) == {"ce", "total"}
    assert got[0]["total"] == pytest.approx(_ce(logits[0], labels, mask), rel=1e-5)
    for k in (1, 2):  # Every student learns from peer 1 only, never from another student.
        mimicry = t * t * _kl(teacher, _softmax(logits[k] / t))
        assert got[k]["ce"] == pytest.approx(_ce(logits[k], labels, mask), rel=1e-5)
        assert got[k]["mimicry"] == pytest.approx(mimicry, rel=1e-4)
        assert got[k]["total"] == pytest.approx(_ce(logits[k], labels, mask) + mimicry, rel=1e-5)


def test_kd_at_temperature_1_is_dml_from_a_fixed_peer(batch):
    logits, _, labels = batch
    kd = _run(methods.get("kd"), logits[:2], labels)
    dml = _run(methods.get("dml"), logits[:2], labels)
    assert kd[1]["total"] == pytest.approx(dml[1]["total"], rel=1e-6)


def test_kd_declares_a_frozen_teacher_and_checks_its_arguments():
    method = methods.get("kd")
    assert method.frozen_peers == (0,) and method.needs_teacher and method.min_peers == 2
    with pytest.raises(UserError, match="at least 2 peers.*peers"):
        method.check_cohort_size(1)
    with pytest.raises(UserError, match="temperature"):
        methods.get("kd", temperature=0.0)


@pytest.mark.parametrize("beta", [0.0, 0.2, 1.5])
def test_entropy_reg_is_the_confidence_penalty(batch, beta):
    logits, _, labels = batch
    mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
    got = _run(methods.get("entropy_reg", beta=beta), logits, labels, mask=mask)
    for k in range(3):
        ce, entropy = _ce(logits[k], labels, mask), _entropy(logits[k])  # H over all examples
        assert got[k]["ce"] == pytest.approx(ce, rel=1e-5)
        assert got[k]["entropy"] == pytest.approx(entropy, rel=1e-5)
        assert got[k]["total"] == pytest.approx(ce - beta * entropy, rel=1e-5, abs=1e-6)
    assert len(_run(methods.get("entropy_reg"), logits[:1], labels)) == 1
    with pytest.raises(UserError, match="beta"):
        methods.get("entropy_reg", beta=-1.0)


@pytest.mark.parametrize("num_peers", [2, 3])
def test_dml_l2_adds_the_feature_distance(batch, num_peers):
    logits, features, labels = batch
    logits, features = logits[:num_peers], features[:num_peers]
    gamma = 0.05
    got = _run(methods.get("dml_l2", gamma=gamma), logits, labels, features=features)
    p = [_softmax(z) for z in logits]
    for k in range(num_peers):
        others = [l for l in range(num_peers) if l != k]
        mimicry = np.mean([_kl(p[l], p[k]) for l in others])
        # Squared Euclidean distance: sum over dimensions, mean over the batch.
        feature_l2 = np.mean([np.mean(np.sum((features[k] - features[l]) ** 2, axis=1))
                              for l in others])
        assert got[k]["mimicry"] == pytest.approx(mimicry, rel=1e-4)
        assert got[k]["feature_l2"] == pytest.approx(feature_l2, rel=1e-5)
        assert got[k]["total"] == pytest.approx(
            _ce(logits[k], labels) + mimicry + gamma * feature_l2, rel=1e-5)
    assert methods.get("dml_l2").uses_features
    with pytest.raises(ValueError, match="features"):
        _run(methods.get("dml_l2"), logits, labels)


@pytest.mark.parametrize("name,hparams", [("kd", {"temperature": 2.0}),
                                          ("entropy_reg", {}),
                                          ("dml_l2", {"gamma": 0.1})])
def test_a_peer_loss_has_no_gradient_into_other_peers(batch, name, hparams):
    logits, features, labels = batch
    method = methods.get(name, **hparams)
    for k in range(3):
        logit_grads, feature_grads = _gradients(method, logits, labels, features, k)
        assert logit_grads[k] is not None and np.abs(logit_grads[k].numpy()).max() > 0
        for l in range(3):
            if l != k:
                assert logit_grads[l] is None or not np.any(logit_grads[l].numpy())
                assert feature_grads[l] is None or not np.any(feature_grads[l].numpy())
        if name == "dml_l2":
            assert np.abs(feature_grads[k].numpy()).max() > 0


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_kd_teacher_stays_fixed_in_the_cohort(update):
    models = [nets.build("tiny", 3, (8, 8, 3), name=f"peer{k}") for k in (1, 2)]
    before = [[v.numpy().copy() for v in m.variables] for m in models]
    cohort = Cohort(models, [keras.optimizers.SGD(0.1, momentum=0.9) for _ in models],
                    methods.get("kd", temperature=2.0), update, weight_decay=1e-3)
    rng = np.random.default_rng(5)
    for _ in range(3):
        metrics = cohort.train_step(tf.constant(rng.normal(size=(8, 8, 8, 3)), tf.float32),
                                    tf.constant(rng.integers(0, 3, 8), tf.int64))
    assert "peer2/mimicry" in metrics and "peer1/mimicry" not in metrics
    # Every teacher variable, BatchNorm moving statistics included, is untouched.
    for old, new in zip(before[0], models[0].variables):
        np.testing.assert_array_equal(old, new.numpy(), err_msg=new.path)
    assert int(cohort.optimizers[0].iterations.numpy()) == 0
    student = {v.path: v.numpy() for v in models[1].variables}
    for old, variable in zip(before[1], models[1].variables):
        if variable.trainable or "moving" in variable.path:
            assert np.abs(old - student[variable.path]).max() > 0, variable.path


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_dml_l2_runs_in_the_cohort_on_the_features_layer(update):
    models = [nets.build("tiny", 3, (8, 8, 3), name=f"peer{k}") for k in (1, 2)]
    cohort = Cohort(models, [keras.optimizers.SGD(0.0) for _ in models],
                    methods.get("dml_l2", gamma=0.5), update)
    images = np.random.default_rng(6).normal(size=(8, 8, 8, 3)).astype(np.float32)
    # Learning rate 0: the step's features are those of the models as they are (training mode).
    features = [keras.Model(m.input, m.get_layer("features").output)(images, training=True).numpy()
                for m in models]
    metrics = cohort.train_step(tf.constant(images), tf.zeros([8], tf.int64))
    expected = np.mean(np.sum((features[0] - features[1]) ** 2, axis=1))
    for k in (1, 2):
        assert float(metrics[f"peer{k}/feature_l2"]) == pytest.approx(expected, rel=1e-4)
        assert float(metrics[f"peer{k}/loss"]) == pytest.approx(
            float(metrics[f"peer{k}/ce"] + metrics[f"peer{k}/mimicry"]) + 0.5 * expected, rel=1e-5)
