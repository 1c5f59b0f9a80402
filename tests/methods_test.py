"""The methods' losses against numpy formulas of docs/methods.md, and their gradients."""

import numpy as np
import pytest
import tensorflow as tf

from dml_tf import methods
from dml_tf.errors import UserError


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p, q):
    """KL(p ‖ q), summed over classes, mean over the batch."""
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def _ce(z, y):
    return float(np.mean(-np.log(_softmax(z)[np.arange(len(y)), y])))


@pytest.fixture
def cohort_logits():
    rng = np.random.default_rng(3)
    logits = [rng.normal(size=(8, 5)) * s for s in (1.0, 2.0, 0.5)]
    labels = rng.integers(0, 5, size=8)
    return logits, labels


def _run(name, logits, labels, **kw):
    method = methods.get(name, **kw)
    out = method.losses([tf.constant(z, tf.float32) for z in logits], tf.constant(labels))
    return [{k: float(v) for k, v in d.items()} for d in out]


@pytest.mark.parametrize("num_peers", [2, 3])
def test_dml_is_equation_10(cohort_logits, num_peers):
    logits, labels = cohort_logits
    logits = logits[:num_peers]
    got = _run("dml", logits, labels)
    p = [_softmax(z) for z in logits]
    for k in range(num_peers):
        mimicry = np.mean([_kl(p[l], p[k]) for l in range(num_peers) if l != k])
        assert got[k]["ce"] == pytest.approx(_ce(logits[k], labels), rel=1e-5)
        assert got[k]["mimicry"] == pytest.approx(mimicry, rel=1e-4)
        assert got[k]["total"] == pytest.approx(_ce(logits[k], labels) + mimicry, rel=1e-5)


def test_dml_js_is_equation_7(cohort_logits):
    logits, labels = cohort_logits
    got = _run("dml_js", logits, labels)
    p = [_softmax(z) for z in logits]
    for k in range(3):
        expected = np.mean([0.5 * (_kl(p[l], p[k]) + _kl(p[k], p[l])) for l in range(3) if l != k])
        assert got[k]["mimicry"] == pytest.approx(expected, rel=1e-4)


def test_dml_e_is_equation_11(cohort_logits):
    logits, labels = cohort_logits
    got = _run("dml_e", logits, labels)
    p = [_softmax(z) for z in logits]
    for k in range(3):
        p_avg = np.mean([p[l] for l in range(3) if l != k], axis=0)
        assert got[k]["mimicry"] == pytest.approx(_kl(p_avg, p[k]), rel=1e-4)
    # With two peers the ensemble of the others is the other peer: dml_e equals dml.
    two = _run("dml_e", logits[:2], labels)
    assert two[0]["mimicry"] == pytest.approx(_run("dml", logits[:2], labels)[0]["mimicry"], rel=1e-6)


def test_independent_is_cross_entropy_only(cohort_logits):
    logits, labels = cohort_logits
    got = _run("independent", logits, labels)
    for k in range(3):
        assert "mimicry" not in got[k]
        assert got[k]["total"] == pytest.approx(_ce(logits[k], labels), rel=1e-5)
    single = _run("independent", logits[:1], labels)
    assert len(single) == 1


# Every peer-to-peer method: targets built from other peers (KDCL: the teacher) are constants.
@pytest.mark.parametrize("name", ["dml", "dml_js", "dml_e", "kdcl_naive", "kdcl_linear",
                                  "kdcl_minlogit", "kdcl_general"])
def test_peer_loss_has_no_gradient_into_other_peers(cohort_logits, name):
    logits, labels = cohort_logits
    variables = [tf.Variable(z, dtype=tf.float32) for z in logits]
    method = methods.get(name)
    for k in range(3):
        with tf.GradientTape() as tape:
            total = method.losses(list(variables), tf.constant(labels))[k]["total"]
        grads = tape.gradient(total, variables)
        assert grads[k] is not None and float(tf.reduce_sum(tf.abs(grads[k]))) > 0
        for l in range(3):
            if l != k:
                assert grads[l] is None or float(tf.reduce_sum(tf.abs(grads[l]))) == 0.0


def test_dml_gradient_matches_closed_form():
    # d/dz_k [CE + KL(p_l ‖ softmax(z_k))] = (q_k − onehot) / B + (q_k − p_l) / B.
    rng = np.random.default_rng(5)
    z1, z2 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    y = np.array([0, 1, 2, 1])
    v1 = tf.Variable(z1, dtype=tf.float32)
    with tf.GradientTape() as tape:
        total = methods.get("dml").losses([v1, tf.constant(z2, tf.float32)], tf.constant(y))[0]["total"]
    expected = (_softmax(z1) - np.eye(3)[y]) / 4 + (_softmax(z1) - _softmax(z2)) / 4
    np.testing.assert_allclose(tape.gradient(total, v1).numpy(), expected, atol=1e-6)


def test_label_smoothing_hyperparameter(cohort_logits):
    logits, labels = cohort_logits
    eps = 0.1
    got = _run("independent", logits[:1], labels, label_smoothing=eps)
    targets = np.eye(5)[labels] * (1 - eps) + eps / 5
    expected = np.mean(-np.sum(targets * np.log(_softmax(logits[0])), axis=1))
    assert got[0]["ce"] == pytest.approx(expected, rel=1e-5)


def test_registry_errors():
    assert set(methods.NAMES) >= {"independent", "dml", "dml_js", "dml_e"}
    with pytest.raises(UserError, match="method=.nope. is not a method"):
        methods.get("nope")
    with pytest.raises(UserError, match="temperature"):
        methods.get("dml", temperature=2.0)
    with pytest.raises(UserError, match="at least 2"):
        methods.get("dml").losses([tf.zeros([2, 3])], tf.constant([0, 1]))
