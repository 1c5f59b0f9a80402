"""One method lifecycle for both training paths: kd, kdcl_general, semi-supervised labels and
per-peer views behave in `MutualLearning.fit` as in the run scripts' cohort steps, and the
cohort's step counter numbers checkpoints and TensorBoard events (kd included)."""

import dataclasses
import glob
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import dml_tf
from dml_tf import config as config_lib
from dml_tf import methods, train_lib
from dml_tf.cohort import Cohort
from dml_tf.errors import UserError

NUM_CLASSES = 3
SHAPE = (6, 6, 1)
BATCH = 8


def _peer(seed, name=None):
    inputs = keras.Input(SHAPE)
    h = keras.layers.Conv2D(3, 3, kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
    h = keras.layers.GlobalAveragePooling2D(name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(
        NUM_CLASSES, kernel_initializer=keras.initializers.GlorotUniform(seed + 50))(h), name=name)


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *SHAPE)).astype(np.float32),
            rng.integers(0, NUM_CLASSES, n).astype(np.int64))


def _weights(models):
    return [v.numpy() for m in models for v in m.weights]


def _assert_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _reference_steps(cohort, images, labels, mask=None):
    for i in range(0, len(labels), BATCH):
        args = [tf.constant(images[i:i + BATCH]), tf.constant(labels[i:i + BATCH])]
        if mask is not None:
            args.append(tf.constant(mask[i:i + BATCH]))
        cohort.train_step(*args)


# --- every method without a declared need: fit is the cohort's step --------------------------

@pytest.mark.parametrize("name", [n for n in methods.NAMES
                                  if not (methods.method_class(n).needs_teacher
                                          or methods.method_class(n).needs_validation)])
def test_fit_trains_every_other_method_as_the_cohorts_steps(name):
    images, labels = _data(24)
    model = dml_tf.MutualLearning([_peer(1), _peer(2)], method=name)
    model.compile(optimizer=keras.optimizers.SGD(0.2))
    history = model.fit(images, labels, batch_size=BATCH, shuffle=False, verbose=0)
    peers = [_peer(1), _peer(2)]
    reference = Cohort(peers, [keras.optimizers.SGD(0.2) for _ in peers], methods.get(name))
    _reference_steps(reference, images, labels)
    _assert_close(_weights(model.peers), _weights(peers))
    assert np.isfinite(history.history["peer2/loss"][0])


# --- kd --------------------------------------------------------------------------------------

def test_kd_in_fit_needs_a_teacher_and_refuses_a_wrong_one(tmp_path):
    with pytest.raises(UserError, match="method 'kd' distils from a fixed, trained teacher "
                                        r"\(peer 1\), which was not given: pass teacher="):
        dml_tf.MutualLearning([_peer(1), _peer(2)], method="kd")
    other = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                              keras.layers.Dense(NUM_CLASSES)])
    with pytest.raises(UserError, match=r"teacher does not have peer 1 \(peers\[0\]\)'s architecture"):
        dml_tf.MutualLearning([_peer(1), _peer(2)], method="kd", teacher=other)
    with pytest.raises(UserError, match="neither a keras.Model nor an existing weights file"):
        dml_tf.MutualLearning([_peer(1), _peer(2)], method="kd", teacher=str(tmp_path / "none.h5"))
    with pytest.raises(UserError, match="teacher= is for methods with a fixed teacher"):
        dml_tf.MutualLearning([_peer(1), _peer(2)], method="dml", teacher=_peer(3))


@pytest.mark.parametrize("as_file", [False, True])
def test_kd_student_in_fit_is_the_cohorts_kd_step_and_the_teacher_never_moves(tmp_path, as_file):
    images, labels = _data()
    teacher = _peer(9)
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    given = teacher
    if as_file:
        given = str(tmp_path / "teacher.weights.h5")
        teacher.save_weights(given)
    model = dml_tf.MutualLearning([_peer(1), _peer(2)], method="kd", teacher=given, temperature=2)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(images, labels, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    for got, want in zip(model.peers[0].get_weights(), teacher_weights):
        np.testing.assert_array_equal(got, want)  # frozen: not one bit moved

    # The run scripts' kd step: a cohort whose peer 1 holds the same teacher weights.
    peers = [_peer(1), _peer(2)]
    peers[0].set_weights(teacher_weights)
    reference = Cohort(peers, [keras.optimizers.SGD(0.1) for _ in peers],
                       methods.get("kd", temperature=2))
    for _ in range(2):
        _reference_steps(reference, images, labels)
    _assert_close(_weights(model.peers), _weights(peers))
    assert model.cohort.steps_done == reference.steps_done == 2 * len(labels) // BATCH


# --- kdcl_general ------------------------------------------------------------------------------

def _kdcl_weights(probs, labels, ridge=1e-6):
    """w = C⁻¹1 / 1ᵀC⁻¹1 of the held-out errors e_k(n) = 1 − p_k(n)[y_n] (KDCL-General)."""
    n = len(labels)
    errors = np.stack([1.0 - p[np.arange(n), labels] for p in probs], axis=1).astype(np.float64)
    c = errors.T @ errors / n
    c += (ridge * np.trace(c) / len(probs) + 1e-12) * np.eye(len(probs))
    w = np.linalg.solve(c, np.ones(len(probs)))
    return w / w.sum()


class _HeldOutProbe(keras.callbacks.Callback):
    """After the lifecycle's own epoch-begin hook: the peers' held-out probabilities then,
    and the ensemble weights the epoch trains with."""

    def __init__(self, held_out):
        super().__init__()
        self.held_out, self.seen = held_out, []

    def on_epoch_begin(self, epoch, logs=None):
        x, y = self.held_out
        probs = [tf.nn.softmax(p(x, training=False)).numpy() for p in self.model.peers]
        self.seen.append((_kdcl_weights(probs, y), self.model.method.teacher_weights.numpy()))


def test_kdcl_general_in_fit_reestimates_its_weights_before_every_epoch():
    images, labels = _data(48)
    held_out = (images[32:], labels[32:])
    with pytest.raises(UserError, match="method 'kdcl_general' re-estimates .*pass held_out="):
        dml_tf.MutualLearning([_peer(1), _peer(2)], method="kdcl_general")
    model = dml_tf.MutualLearning([_peer(1), _peer(2)], method="kdcl_general", held_out=held_out)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    probe = _HeldOutProbe(held_out)
    history = model.fit(images[:32], labels[:32], batch_size=BATCH, epochs=3, verbose=0,
                        callbacks=[probe])
    for want, got in probe.seen:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not np.allclose(probe.seen[0][1], 0.5)  # moved from the uniform start
    assert not np.allclose(probe.seen[0][1], probe.seen[-1][1])  # and again as the peers learn
    assert history.history["kdcl/weight1"][-1] == pytest.approx(float(probe.seen[-1][1][0]))


def test_held_out_is_refused_for_a_method_that_does_not_use_it():
    images, labels = _data()
    with pytest.raises(UserError, match="held_out= is for methods .*validation_data"):
        dml_tf.MutualLearning([_peer(1), _peer(2)], method="dml", held_out=(images, labels))


# --- semi-supervised labels and per-peer views -------------------------------------------------

def test_semi_supervised_labels_in_fit_are_the_cohorts_masked_step():
    images, labels = _data()
    labels = labels.copy()
    labels[::3] = -1  # unlabelled: mimicry only
    with pytest.raises(UserError, match=r"labels must be class indices in \[0, 3\)"):
        model = dml_tf.MutualLearning([_peer(1), _peer(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        model.fit(images, labels, batch_size=BATCH, verbose=0)
    model = dml_tf.MutualLearning([_peer(1), _peer(2)], semi_supervised=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(images, labels, batch_size=BATCH, shuffle=False, verbose=0)
    peers = [_peer(1), _peer(2)]
    reference = Cohort(peers, [keras.optimizers.SGD(0.1) for _ in peers], methods.get("dml"))
    _reference_steps(reference, images, np.maximum(labels, 0), (labels >= 0).astype(np.float32))
    _assert_close(_weights(model.peers), _weights(peers))


def test_per_peer_views_in_fit_are_the_cohorts_views_step():
    images, labels = _data()
    views = (images, images[:, ::-1])  # peer 2 sees the images flipped upside down
    model = dml_tf.MutualLearning([_peer(1), _peer(2)], per_peer_views=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(tf.data.Dataset.from_tensor_slices((views, labels)).batch(BATCH), verbose=0)
    peers = [_peer(1), _peer(2)]
    reference = Cohort(peers, [keras.optimizers.SGD(0.1) for _ in peers], methods.get("dml"))
    for i in range(0, len(labels), BATCH):
        reference.train_step(tuple(tf.constant(v[i:i + BATCH]) for v in views),
                             tf.constant(labels[i:i + BATCH]))
    _assert_close(_weights(model.peers), _weights(peers))


# --- one step counter ------------------------------------------------------------------------

def _npz(path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (56, 16, 16, 3), dtype=np.uint8)
    y = np.arange(56) % 4
    np.savez(path, x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])
    return str(path)


def _config(model_dir, data, **overrides):
    return dataclasses.replace(config_lib.Config(
        dataset="npz", data_dir=data, nets=("tiny", "tiny"), method="independent", epochs=1,
        batch_size=8, eval_batch_size=8, learning_rate=0.05, export=False,
        model_dir=str(model_dir)), **overrides)


def _event_steps(model_dir, tag):
    steps = []
    for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def test_kd_run_numbers_checkpoints_and_events_by_the_cohorts_steps(tmp_path):
    data = _npz(tmp_path / "d.npz")
    train_lib.train_and_evaluate(_config(tmp_path / "teacher", data))
    kd_dir = tmp_path / "kd"
    train_lib.train_and_evaluate(_config(kd_dir, data, method="kd", epochs=4, steps_per_epoch=3,
                                         teacher_checkpoint=str(tmp_path / "teacher")))
    numbers = sorted(int(re.search(r"ckpt-(\d+)\.index", p).group(1))
                     for p in glob.glob(str(kd_dir / "checkpoints" / "ckpt-*.index")))
    assert numbers == [6, 9, 12]  # three kept, one per epoch of 3 steps (the teacher never steps)
    assert _event_steps(str(kd_dir), "train/peer2/loss") == [3, 6, 9, 12]


def test_a_full_disk_during_a_runs_checkpoint_is_one_sentence_and_keeps_the_last(tmp_path,
                                                                                monkeypatch):
    """The run loop saves through checkpoints.save: ENOSPC at the second epoch's save."""
    import errno

    data = _npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    real_save = tf.train.CheckpointManager.save
    saves = []

    def save(manager, checkpoint_number=None, **kwargs):
        saves.append(checkpoint_number)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(manager, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    with pytest.raises(UserError, match=r"is full .*run the same command to resume from ckpt-6"):
        train_lib.train_and_evaluate(_config(run, data, epochs=3))
    monkeypatch.undo()
    assert sorted(os.listdir(run / "checkpoints")) == [
        "checkpoint", "ckpt-6.data-00000-of-00001", "ckpt-6.index"]
    results = train_lib.train_and_evaluate(_config(run, data, epochs=3))  # resumes, finishes
    assert "test/ensemble/top1" in results


def test_an_evaluation_that_fails_keeps_the_trained_epoch(tmp_path, monkeypatch):
    """A test image found damaged at the epoch's evaluation: the epoch's training is
    checkpointed first, and the run resumes by evaluating it, not by training it again."""
    from dml_tf import tasks

    data = _npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    evaluate = tasks.ClassificationTask.evaluate

    def damaged(self, cohort, batch_size):
        raise UserError("test image 3 cannot be decoded")

    monkeypatch.setattr(tasks.ClassificationTask, "evaluate", damaged)
    with pytest.raises(UserError, match="cannot be decoded"):
        train_lib.train_and_evaluate(_config(run, data, epochs=1))
    assert glob.glob(str(run / "checkpoints" / "ckpt-6.index"))  # 48 images / 8: one epoch
    monkeypatch.setattr(tasks.ClassificationTask, "evaluate", evaluate)
    steps = []
    real_step = Cohort.train_step
    monkeypatch.setattr(Cohort, "train_step", lambda self, *a: steps.append(1) or real_step(self, *a))
    results = train_lib.train_and_evaluate(_config(run, data, epochs=1))
    assert steps == [] and "test/ensemble/top1" in results


def test_a_checkpoint_from_before_the_step_counter_restores_with_the_optimizers_count(tmp_path):
    """Runs started before the cohort had a step counter resume: their checkpoints lack it,
    and the count becomes the most any peer's optimizer stepped."""
    images, labels = _data()
    peers = [_peer(1, "peer1"), _peer(2, "peer2")]
    cohort = Cohort(peers, [keras.optimizers.SGD(0.1) for _ in peers], methods.get("dml"))
    _reference_steps(cohort, images, labels)  # 4 steps
    older = {k: v for k, v in train_lib.checkpoint_trackables(cohort).items()
             if k != "step_counter"}  # the layout before this change
    tf.train.CheckpointManager(tf.train.Checkpoint(**older), str(tmp_path), 3).save(
        checkpoint_number=4)
    fresh = Cohort([_peer(5, "peer1"), _peer(6, "peer2")],
                   [keras.optimizers.SGD(0.1) for _ in range(2)], methods.get("dml"))
    restored = train_lib.restore_checkpoint(fresh, train_lib.checkpoint_trackables(fresh),
                                            str(tmp_path))
    assert restored.endswith("ckpt-4") and fresh.steps_done == 4
    _assert_close(_weights(fresh.models), _weights(cohort.models))
