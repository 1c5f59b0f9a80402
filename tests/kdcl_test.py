"""KDCL's four teachers and its loss against numpy on hand-made logits (Guo et al. 2020)."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from dml_tf import methods
from dml_tf.cohort import Cohort
from dml_tf.errors import UserError
from dml_tf.methods import kdcl

KDCL_NAMES = ("kdcl_naive", "kdcl_linear", "kdcl_minlogit", "kdcl_general")


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _ce(z, y):
    """Hard-label cross-entropy, mean over the batch."""
    return float(np.mean(-np.log(_softmax(z)[np.arange(len(y)), y])))


def _kl(p, q):
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def _tf(arrays):
    return [tf.constant(z, tf.float32) for z in arrays]


@pytest.fixture
def cohort_logits():
    rng = np.random.default_rng(7)
    logits = [rng.normal(size=(6, 4)) * s for s in (1.0, 2.5, 0.7)]
    labels = rng.integers(0, 4, size=6)
    return logits, labels


# --- Teachers ----------------------------------------------------------------------

def test_minlogit_hand_case():
    # Two peers, three examples, three classes.
    z1 = np.array([[2., 1., 0.], [0., 3., 1.], [1., 1., 4.]])
    z2 = np.array([[1., 3., -4.], [2., 0., -4.], [-3., 1., 2.]])
    y = np.array([0, 1, 2])
    # z1 − z1[y]: [0, -1, -2], [-3, 0, -2], [-3, -3, 0]
    # z2 − z2[y]: [0, 2, -5],  [2, 0, -4],  [-5, -1, 0]
    expected = np.array([[0., -1., -5.], [-3., 0., -4.], [-5., -3., 0.]])
    teacher = methods.get("kdcl_minlogit").teacher(_tf([z1, z2]), tf.constant(y))
    np.testing.assert_allclose(teacher.numpy(), expected, atol=1e-6)


def test_minlogit_unlabelled_examples_use_the_mean_prediction():
    z1 = np.array([[2., 1., 0.], [0., 3., 1.]])
    z2 = np.array([[1., 3., -4.], [2., 0., -4.]])
    # Example 2 is unlabelled; its stored label (0) must not be used: the mean logits
    # [1, 1.5, -1.5] make class 1 the stand-in.
    teacher = methods.get("kdcl_minlogit").teacher(
        _tf([z1, z2]), tf.constant([0, 0]), label_mask=tf.constant([1.0, 0.0]))
    np.testing.assert_allclose(teacher.numpy()[1], [-3., 0., -4.], atol=1e-6)


def test_naive_picks_the_lowest_ce_peer_of_the_batch():
    # Peer 2 is best on the batch although peer 1 is best on example 1.
    z1 = np.array([[3., 0., 0.], [0., 0., 0.], [0., 0., 0.]])
    z2 = np.array([[1., 0., 0.], [0., 2., 0.], [0., 0., 2.]])
    z3 = np.zeros((3, 3))
    y = np.array([0, 1, 2])
    assert np.argmin([_ce(z, y) for z in (z1, z2, z3)]) == 1
    method = methods.get("kdcl_naive")
    teacher = method.teacher(_tf([z1, z2, z3]), tf.constant(y))
    np.testing.assert_allclose(teacher.numpy(), z2)
    # Only labelled examples count: on example 1 alone, peer 1 is best.
    masked = method.teacher(_tf([z1, z2, z3]), tf.constant(y),
                            label_mask=tf.constant([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(masked.numpy(), z1)


def test_naive_on_random_logits(cohort_logits):
    logits, labels = cohort_logits
    best = int(np.argmin([_ce(z, labels) for z in logits]))
    teacher = methods.get("kdcl_naive").teacher(_tf(logits), tf.constant(labels))
    np.testing.assert_allclose(teacher.numpy(), logits[best], rtol=1e-6)


def _simplex_grid(num_peers, step):
    n = int(round(1 / step))
    points = [c for c in itertools.product(range(n + 1), repeat=num_peers - 1) if sum(c) <= n]
    return np.array([list(c) + [n - sum(c)] for c in points], np.float64) / n


def _grid_optimum(logits, labels, step, mask=None):
    grid = _simplex_grid(len(logits), step)
    mixes = np.einsum("gk,kbm->gbm", grid, np.stack(logits))
    mixes = mixes - mixes.max(axis=-1, keepdims=True)
    log_p = mixes - np.log(np.exp(mixes).sum(axis=-1, keepdims=True))
    per_example = -log_p[:, np.arange(len(labels)), labels]
    a = np.ones(len(labels)) if mask is None else np.asarray(mask, np.float64)
    ce = per_example @ a / a.sum()
    return float(ce.min()), grid[np.argmin(ce)]


def _mix_ce(weights, logits, labels, mask=None):
    z = np.einsum("k,kbm->bm", weights, np.stack(logits))
    per_example = -np.log(_softmax(z)[np.arange(len(labels)), labels])
    a = np.ones(len(labels)) if mask is None else np.asarray(mask, np.float64)
    return float(per_example @ a / a.sum())


@pytest.mark.parametrize("num_peers,step", [(2, 0.001), (3, 0.01)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_linear_matches_grid_search_over_the_simplex(num_peers, step, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=10)
    # Peers of different scale and quality, some partly right: optima fall inside the
    # simplex, on an edge or at a vertex depending on the seed.
    logits = [rng.normal(size=(10, 5)) * rng.uniform(0.5, 3.0)
              + rng.uniform(0, 3) * np.eye(5)[labels] for _ in range(num_peers)]
    grid_ce, grid_w = _grid_optimum(logits, labels, step)
    solve = tf.function(methods.get("kdcl_linear").solve_weights)  # graph mode, as in training
    weights = solve(_tf(logits), tf.constant(labels)).numpy().astype(np.float64)
    assert np.all(weights >= 0) and weights.sum() == pytest.approx(1.0, abs=1e-5)
    assert _mix_ce(weights, logits, labels) <= grid_ce + 1e-5, (weights, grid_w)


def test_linear_ill_conditioned_logits():
    # Large, confident logits (nearly one-hot softmax): slow for first-order solvers.
    rng = np.random.default_rng(19)
    labels = rng.integers(0, 20, size=16)
    logits = [rng.normal(size=(16, 20)) * s + b * np.eye(20)[labels]
              for s, b in ((10.0, 2.0), (6.0, 7.0), (1.0, 3.0))]
    grid_ce, _ = _grid_optimum(logits, labels, 0.01)
    weights = methods.get("kdcl_linear").solve_weights(_tf(logits), tf.constant(labels))
    assert _mix_ce(weights.numpy().astype(np.float64), logits, labels) <= grid_ce + 1e-5


def test_linear_identical_peers():
    z = tf.constant(np.random.default_rng(0).normal(size=(4, 5)), tf.float32)
    weights = methods.get("kdcl_linear").solve_weights([z, z], tf.constant([0, 1, 2, 4]))
    assert np.all(np.isfinite(weights.numpy())) and float(tf.reduce_sum(weights)) == pytest.approx(1.0)


def test_linear_vertex_and_mask():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 4, size=8)
    good = 4.0 * np.eye(4)[labels]
    logits = [good, rng.normal(size=(8, 4))]
    weights = methods.get("kdcl_linear").solve_weights(_tf(logits), tf.constant(labels))
    np.testing.assert_allclose(weights.numpy(), [1.0, 0.0], atol=1e-6)
    # With a mask, only labelled examples enter the objective.
    logits = [rng.normal(size=(8, 4)) * 2 for _ in range(3)]
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 0], np.float32)
    grid_ce, _ = _grid_optimum(logits, labels, 0.01, mask)
    weights = methods.get("kdcl_linear").solve_weights(
        _tf(logits), tf.constant(labels), label_mask=tf.constant(mask))
    assert _mix_ce(weights.numpy().astype(np.float64), logits, labels, mask) <= grid_ce + 1e-5


def _probs_with_errors(errors, labels, num_classes=3):
    """[N, M] probabilities whose target entry is 1 − error (the rest spread evenly)."""
    errors = np.asarray(errors, np.float64)
    probs = np.repeat((errors / (num_classes - 1))[:, None], num_classes, axis=1)
    probs[np.arange(len(labels)), labels] = 1.0 - errors
    return probs


def test_general_weights_two_peers_by_hand():
    labels = np.array([0, 1, 2, 1])
    e1, e2 = [0.1, 0.3, 0.2, 0.4], [0.3, 0.1, 0.5, 0.2]
    # C_ij = 1/N Σ_n e_i e_j: c11 = 0.30/4, c22 = 0.39/4, c12 = 0.24/4;
    # w1 = (c22 − c12)/(c11 + c22 − 2 c12) = 0.15/0.21 = 5/7.
    method = methods.get("kdcl_general")
    weights = method.update_weights(
        [_probs_with_errors(e1, labels), _probs_with_errors(e2, labels)], labels)
    np.testing.assert_allclose(weights, [5 / 7, 2 / 7], atol=1e-5)
    np.testing.assert_allclose(method.teacher_weights.numpy(), [5 / 7, 2 / 7], atol=1e-5)
    assert method.summaries() == pytest.approx({"kdcl/weight1": 5 / 7, "kdcl/weight2": 2 / 7},
                                               abs=1e-5)


def test_general_three_peers_follow_closed_form_and_drive_the_teacher(cohort_logits):
    logits, labels = cohort_logits
    rng = np.random.default_rng(4)
    val_labels = rng.integers(0, 3, size=20)
    errors = rng.uniform(0.0, 0.8, size=(20, 3))
    method = methods.get("kdcl_general")
    method.check_cohort_size(3)
    np.testing.assert_allclose(method.teacher_weights.numpy(), [1 / 3] * 3)  # before any epoch
    weights = method.update_weights(
        [_probs_with_errors(errors[:, k], val_labels) for k in range(3)], val_labels)
    c_inv_1 = np.linalg.solve(errors.T @ errors / 20, np.ones(3))
    np.testing.assert_allclose(weights, c_inv_1 / c_inv_1.sum(), rtol=1e-4)
    teacher = method.teacher(_tf(logits), tf.constant(labels))
    np.testing.assert_allclose(teacher.numpy(), np.einsum("k,kbm->bm", weights, np.stack(logits)),
                               rtol=1e-5, atol=1e-5)


def test_general_identical_peers_are_weighted_equally_thanks_to_the_ridge():
    labels = np.array([0, 1])
    probs = _probs_with_errors([0.2, 0.4], labels)
    weights = methods.get("kdcl_general").update_weights([probs, probs], labels)
    np.testing.assert_allclose(weights, [0.5, 0.5], atol=1e-6)


def test_general_user_errors():
    method = methods.get("kdcl_general")
    with pytest.raises(UserError, match="--val_fraction"):
        method.update_weights([np.zeros((0, 3)), np.zeros((0, 3))], np.zeros(0))
    with pytest.raises(UserError, match="NaN"):
        method.update_weights([np.full((2, 3), np.nan)] * 2, np.array([0, 1]))
    assert methods.get("kdcl_general").summaries() == {}
    assert methods.get("kdcl_general").needs_validation


# --- The loss -----------------------------------------------------------------------

def _numpy_teacher(name, logits, labels):
    if name == "kdcl_naive":
        return logits[int(np.argmin([_ce(z, labels) for z in logits]))]
    if name == "kdcl_minlogit":
        stacked = np.stack(logits)
        return (stacked - stacked[:, np.arange(len(labels)), labels][..., None]).min(axis=0)
    if name == "kdcl_general":  # uniform until the first update
        return np.mean(logits, axis=0)
    weights = methods.get("kdcl_linear").solve_weights(_tf(logits), tf.constant(labels))
    return np.einsum("k,kbm->bm", weights.numpy().astype(np.float64), np.stack(logits))


@pytest.mark.parametrize("name", KDCL_NAMES)
def test_loss_is_ce_plus_lambda_t2_kl(cohort_logits, name):
    logits, labels = cohort_logits
    t, lam = 3.0, 0.5
    method = methods.get(name, temperature=t, weight=lam)
    got = tf.function(method.losses)(_tf(logits), tf.constant(labels))  # graph mode
    teacher = _numpy_teacher(name, logits, labels)
    for k, z in enumerate(logits):
        mimicry = lam * t * t * _kl(_softmax(teacher / t), _softmax(z / t))
        assert float(got[k]["ce"]) == pytest.approx(_ce(z, labels), rel=1e-5)
        assert float(got[k]["mimicry"]) == pytest.approx(mimicry, rel=1e-4, abs=1e-6)
        assert float(got[k]["total"]) == pytest.approx(_ce(z, labels) + mimicry, rel=1e-5)


def test_loss_masks_ce_but_not_distillation(cohort_logits):
    logits, labels = cohort_logits
    mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
    got = methods.get("kdcl_general").losses(_tf(logits), tf.constant(labels),
                                             label_mask=tf.constant(mask))
    teacher = np.mean(logits, axis=0)
    keep = mask.astype(bool)
    assert float(got[0]["ce"]) == pytest.approx(_ce(logits[0][keep], labels[keep]), rel=1e-5)
    assert float(got[0]["mimicry"]) == pytest.approx(
        4 * _kl(_softmax(teacher / 2), _softmax(logits[0] / 2)), rel=1e-4)


def test_distillation_gradient_closed_form():
    # d/dz_k [λT² KL(softmax(z_t/T) ‖ softmax(z_k/T))] = λT (q_k − p_t) / B.
    rng = np.random.default_rng(2)
    z_t, z_k = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    v = tf.Variable(z_k, dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss = 0.5 * kdcl.distillation_loss(tf.constant(z_t, tf.float32), v, 2.0)
    expected = 0.5 * 2.0 * (_softmax(z_k / 2) - _softmax(z_t / 2)) / 4
    np.testing.assert_allclose(tape.gradient(loss, v).numpy(), expected, atol=1e-6)


# --- Registry and the training loop's side ------------------------------------------

def test_registry_hyperparameters():
    for name in KDCL_NAMES:
        assert name in methods.NAMES
        method = methods.get(name, temperature=4, weight=0.5, label_smoothing=0.1)
        assert (method.temperature, method.weight, method.label_smoothing) == (4.0, 0.5, 0.1)
        assert method.min_peers == 2
    assert methods.get("kdcl_linear").temperature == 2.0 and methods.get("kdcl_linear").weight == 1.0
    with pytest.raises(UserError, match="beta"):
        methods.get("kdcl_naive", beta=1.0)
    with pytest.raises(UserError, match="temperature"):
        methods.get("kdcl_minlogit", temperature=0)
    with pytest.raises(UserError, match="weight"):
        methods.get("kdcl_minlogit", weight=-1)
    with pytest.raises(UserError, match="temperature must be a positive number, got 'hot'"):
        methods.get("kdcl_linear", temperature="hot")
    with pytest.raises(UserError, match="at least 2"):
        methods.get("kdcl_naive").losses([tf.zeros([2, 3])], tf.constant([0, 1]))


def _linear_model(seed, name):
    inputs = keras.Input((2, 2, 1))
    init = keras.initializers.RandomNormal(stddev=1.0, seed=seed)
    logits = keras.layers.Dense(3, kernel_initializer=init, bias_initializer=init)(
        keras.layers.Flatten()(inputs))
    return keras.Model(inputs, logits, name=name)


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_cohort_reads_general_weights_each_step_without_retracing(update):
    models = [_linear_model(1, "peer1"), _linear_model(2, "peer2")]
    method = methods.get("kdcl_general")
    cohort = Cohort(models, [keras.optimizers.SGD(0.0) for _ in models], method, update)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 2, 2, 1)).astype(np.float32)
    labels = rng.integers(0, 3, size=6)
    before = cohort.train_step(images, labels)
    assert float(before["peer1/mimicry"]) > 0
    # Weights (1, 0): peer 1 is the teacher, so its distillation term vanishes.
    method.teacher_weights.assign([1.0, 0.0])
    after = cohort.train_step(images, labels)
    assert float(after["peer1/mimicry"]) == pytest.approx(0.0, abs=1e-6)
    assert float(after["peer2/mimicry"]) > 0
    assert cohort.trace_count == 1


@pytest.mark.parametrize("name", ["kdcl_naive", "kdcl_linear", "kdcl_minlogit"])
def test_cohort_step_runs(name):
    models = [_linear_model(1, "peer1"), _linear_model(2, "peer2"), _linear_model(3, "peer3")]
    cohort = Cohort(models, [keras.optimizers.SGD(0.1) for _ in models], methods.get(name))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 2, 2, 1)).astype(np.float32)
    metrics = cohort.train_step(images, rng.integers(0, 3, size=6))
    assert all(np.isfinite(float(v)) for v in metrics.values())
