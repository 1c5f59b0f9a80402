"""Interruption, divergence and a reused model_dir never cost a run (issue: reliability)."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from dml_tf import config as config_lib
from dml_tf import train_lib
from dml_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "data.npz"
    np.savez(path, x_train=rng.integers(0, 256, (240, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(240) % 4, x_test=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(16) % 4)
    return str(path)


def _cli(model_dir, npz, *extra):
    return [sys.executable, os.path.join(ROOT, "run_cifar.py"), "--dataset=npz", f"--data_dir={npz}",
            "--nets=tiny,tiny", "--method=dml", "--batch_size=8", "--epochs=2",
            "--steps_per_epoch=30", "--learning_rate=0.05", "--eval_every_epochs=2",
            "--export=false", "--deterministic", f"--model_dir={model_dir}", *extra]


def _weights(model_dir):
    """Every peer and optimiser tensor of the latest checkpoint."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")))
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith(("peer", "optimizer"))]
    return {n: reader.get_tensor(n) for n in names}


def _wait_for_checkpoint(model_dir, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        # The state file, not the data files: CheckpointManager names a checkpoint in
        # `checkpoints/checkpoint` only once it is complete, and resume reads that name.
        if tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint within the time limit")


@pytest.fixture(scope="module")
def uninterrupted(npz, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    subprocess.run(_cli(model_dir, npz), check=True, env=ENV, timeout=300, capture_output=True)
    return _weights(model_dir)


def test_sigkill_then_same_command_resumes_to_identical_weights(npz, uninterrupted, tmp_path):
    model_dir = str(tmp_path / "run")
    command = _cli(model_dir, npz, "--checkpoint_every_steps=1")
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_checkpoint(model_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    resumed = subprocess.run(command, env=ENV, timeout=300, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stdout
    weights = _weights(model_dir)
    assert weights.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)


def test_sigterm_writes_a_checkpoint_of_the_position_and_exits(npz, uninterrupted, tmp_path):
    model_dir = str(tmp_path / "run")
    command = _cli(model_dir, npz, "--checkpoint_every_steps=5")
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_checkpoint(model_dir, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM: stopped at epoch" in stderr and "Traceback" not in stderr
    resumed = subprocess.run(command, env=ENV, timeout=300, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name, value in uninterrupted.items():
        np.testing.assert_array_equal(_weights(model_dir)[name], value, err_msg=name)


def _config(model_dir, npz, **overrides):
    base = config_lib.Config(dataset="npz", data_dir=npz, nets=("tiny", "tiny"), method="dml",
                             batch_size=8, epochs=1, steps_per_epoch=4, export=False,
                             model_dir=str(model_dir))
    return dataclasses.replace(base, **overrides)


def test_nan_stops_naming_peer_and_step_and_keeps_the_checkpoint(npz, tmp_path):
    model_dir = tmp_path / "run"
    # Simultaneous updates: step 1's losses are finite (computed before the absurd update),
    # step 2's are not.
    with pytest.raises(UserError, match=r"Peer \d's loss became (nan|inf) at step 2"):
        train_lib.train_and_evaluate(_config(model_dir, npz, learning_rate=1e30,
                                             update="simultaneous", checkpoint_every_steps=1))
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    assert latest.endswith("ckpt-1")  # the last step whose loss was finite
    assert tf.train.load_checkpoint(latest).get_tensor("step_in_epoch/.ATTRIBUTES/VARIABLE_VALUE") == 1


def test_nan_skip_drops_the_updates_and_counts_them(npz, tmp_path):
    """lr 1e30: the first (finite) update leaves huge weights, every later loss is non-finite
    and dropped (counted in TensorBoard); a cohort that cannot predict is still no result."""
    from train_lib_test import _scalar_tags
    with pytest.raises(UserError, match="Training diverged: the metrics test/.* are not finite"):
        train_lib.train_cohort(_config(tmp_path / "run", npz, learning_rate=1e30, on_nan="skip",
                                       epochs=2))
    assert any(t.endswith("skipped_steps") for t in _scalar_tags(str(tmp_path / "run")))
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_skipped_update_leaves_the_peer_untouched(update):
    import keras
    from dml_tf import methods, nets
    from dml_tf.cohort import Cohort
    poison = tf.Variable(1.0)

    class Poisoned(methods.dml.DML):
        """DML whose losses are NaN while `poison` is 1."""

        def losses(self, logits, labels, **kw):
            out = super().losses(logits, labels, **kw)
            for d in out:
                d["total"] = d["total"] + tf.where(poison > 0, float("nan"), 0.0)
            return out

    models = [nets.build("tiny", 4, (16, 16, 3), name=f"peer{k}") for k in (1, 2)]
    cohort = Cohort(models, [keras.optimizers.SGD(0.1) for _ in models], Poisoned(), update,
                    skip_nonfinite=True)
    before = [[v.numpy().copy() for v in m.trainable_variables] for m in models]
    images = tf.constant(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), tf.float32)
    labels = tf.constant([0, 1, 2, 3], tf.int64)
    out = cohort.train_step(images, labels)
    assert not np.isfinite(float(out["peer1/loss"]))
    for old, model in zip(before, models):
        for o, v in zip(old, model.trainable_variables):
            np.testing.assert_array_equal(o, v.numpy())
    poison.assign(0.0)
    cohort.train_step(images, labels)
    assert any(np.abs(o - v.numpy()).max() > 0
               for o, v in zip(before[0], models[0].trainable_variables))


def test_another_configuration_is_refused_unless_overwrite(npz, tmp_path):
    model_dir = tmp_path / "run"
    train_lib.train_and_evaluate(_config(model_dir, npz))
    with pytest.raises(UserError, match="--overwrite"):
        train_lib.train_and_evaluate(_config(model_dir, npz, method="independent"))
    results = train_lib.train_and_evaluate(_config(model_dir, npz, method="independent",
                                                   overwrite=True))
    assert "train/peer1/mimicry" not in results


@pytest.mark.parametrize("args, words", [
    (["--method=foo"], "--method=foo"),
    (["--epochs=-1"], "--epochs"),
    (["--nets=resnet32"], "--nets"),
    (["--method=kd", "--nets=tiny,tiny", "--dataset=digits"], "--teacher_checkpoint"),
])
def test_bad_input_is_one_sentence_and_exit_2(args, words, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run_cifar.py"), *args,
                           f"--model_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0]


def test_teacher_of_another_architecture_is_refused(npz, tmp_path):
    train_lib.train_and_evaluate(_config(tmp_path / "teacher", npz, method="independent"))
    with pytest.raises(UserError, match="--teacher_checkpoint"):
        train_lib.train_and_evaluate(_config(tmp_path / "kd", npz, method="kd",
                                             nets=("resnet32", "tiny"),
                                             teacher_checkpoint=str(tmp_path / "teacher")))


def test_batch_the_replicas_do_not_divide_is_refused():
    from dml_tf import distribute

    class ThreeReplicas:
        num_replicas_in_sync = 3

    assert distribute.replica_batch_size(12, ThreeReplicas()) == 4
    with pytest.raises(UserError, match="--batch_size=64 must be divisible by the 3 replicas"):
        distribute.replica_batch_size(64, ThreeReplicas())
