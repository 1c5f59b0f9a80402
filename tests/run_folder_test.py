"""A run folder never loses a user's files, never calls a broken model a success, never
silently starts over: faults injected into real runs (issue: trustworthy runs)."""

import dataclasses
import glob
import json
import os
import signal

import numpy as np
import pytest
import tensorflow as tf

from dml_tf import cohort as cohort_lib
from dml_tf import config as config_lib
from dml_tf import export, tasks, train_lib
from dml_tf.errors import UserError


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "data.npz"
    _write_npz(path, rng)
    return str(path)


def _write_npz(path, rng):
    np.savez(path, x_train=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
             y_train=np.arange(64) % 4, x_test=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8),
             y_test=np.arange(12) % 4)


def _config(model_dir, npz, **overrides):
    base = config_lib.Config(dataset="npz", data_dir=npz, nets=("tiny", "tiny"), method="dml",
                             batch_size=8, epochs=2, steps_per_epoch=3, learning_rate=0.05,
                             export=False, deterministic=True, model_dir=str(model_dir))
    return dataclasses.replace(base, **overrides)


def _checkpoint_dir(model_dir):
    return os.path.join(str(model_dir), "checkpoints")


def _numbers(model_dir):
    return sorted(int(p[:-len(".index")].rsplit("-", 1)[1])
                  for p in glob.glob(os.path.join(_checkpoint_dir(model_dir), "ckpt-*.index")))


def test_overwrite_keeps_the_users_files_and_the_data_inside_model_dir(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    data = model_dir / "data.npz"
    _write_npz(data, np.random.default_rng(1))
    (model_dir / "notes.md").write_text("my notes")
    train_lib.train_and_evaluate(_config(model_dir, str(data), epochs=1))
    results = train_lib.train_and_evaluate(_config(model_dir, str(data), epochs=1,
                                                   method="independent", overwrite=True))
    assert "train/peer1/mimicry" not in results
    assert (model_dir / "notes.md").read_text() == "my notes" and data.exists()


def test_refused_run_leaves_no_folder_behind(tmp_path):
    with pytest.raises(UserError, match="--data_dir"):
        train_lib.train_and_evaluate(_config(tmp_path / "run", None))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["deleted", "garbled"])
def test_lost_state_file_resumes_from_the_checkpoint_files(npz, tmp_path, damage, capsys):
    model_dir = tmp_path / "run"
    train_lib.train_and_evaluate(_config(model_dir, npz, epochs=1))
    state = os.path.join(_checkpoint_dir(model_dir), "checkpoint")
    os.remove(state) if damage == "deleted" else open(state, "w").write("\x00garbage {{{")
    capsys.readouterr()
    train_lib.train_and_evaluate(_config(model_dir, npz, epochs=2))
    out = capsys.readouterr().out
    assert "missing or unreadable" in out and "Resumed from" in out and "ckpt-3" in out
    assert _numbers(model_dir) == [3, 6]
    assert tf.train.latest_checkpoint(_checkpoint_dir(model_dir)).endswith("ckpt-6")


def _truncate_data(prefix):
    path = glob.glob(prefix + ".data-*")[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble_index(prefix):
    with open(prefix + ".index", "r+b") as f:
        f.seek(0)
        f.write(b"\xff" * 64)


def _delete_shard(prefix):
    os.remove(glob.glob(prefix + ".data-*")[0])


@pytest.mark.parametrize("damage", [_truncate_data, _garble_index, _delete_shard])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(npz, tmp_path, damage, capsys):
    model_dir = tmp_path / "run"
    config = _config(model_dir, npz, epochs=2, checkpoint_every_steps=1)
    train_lib.train_and_evaluate(dataclasses.replace(config, epochs=1))  # ckpt-1, 2, 3
    damage(os.path.join(_checkpoint_dir(model_dir), "ckpt-3"))
    capsys.readouterr()
    cohort, results = train_lib.train_cohort(config)
    out = capsys.readouterr().out
    assert "Damaged checkpoint ckpt-3" in out and "newest intact one, ckpt-2" in out
    assert "Resumed from" in out and "ckpt-2 (epoch 1, step 2" in out
    assert os.listdir(os.path.join(_checkpoint_dir(model_dir), "damaged"))  # kept, not deleted
    assert np.isfinite(results["test/ensemble/top1"])
    assert not glob.glob(os.path.join(_checkpoint_dir(model_dir), "*_temp"))


def test_no_intact_checkpoint_is_refused_never_trained_over(npz, tmp_path):
    model_dir = tmp_path / "run"
    train_lib.train_and_evaluate(_config(model_dir, npz, epochs=1))
    for prefix in glob.glob(os.path.join(_checkpoint_dir(model_dir), "ckpt-*.index")):
        _truncate_data(prefix[:-6])
    with pytest.raises(UserError, match="none loads.*--overwrite"):
        train_lib.train_and_evaluate(_config(model_dir, npz, epochs=2))
    assert _numbers(model_dir) == [3]  # nothing written over them
    train_lib.train_and_evaluate(_config(model_dir, npz, epochs=1, overwrite=True))


def test_finished_run_run_again_changes_nothing(npz, tmp_path, capsys):
    model_dir = tmp_path / "run"
    config = _config(model_dir, npz, epochs=1, export=True)
    train_lib.train_and_evaluate(config)
    files = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(model_dir / "**"), recursive=True)
             if os.path.isfile(p) and not p.endswith(".lock")}
    results = (model_dir / "results.json").read_bytes()
    capsys.readouterr()
    again = train_lib.train_and_evaluate(config)
    assert "holds a finished run" in capsys.readouterr().out
    assert (model_dir / "results.json").read_bytes() == results
    assert any(k.startswith("train/") for k in again)
    now = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(model_dir / "**"), recursive=True)
           if os.path.isfile(p) and not p.endswith(".lock")}
    changed = sorted(p for p in now if files.get(p) != now[p] and not p.endswith("flags.json"))
    assert changed == [], changed  # no new event file, no re-export, no checkpoint


def test_incomplete_export_of_a_finished_run_is_redone(npz, tmp_path):
    model_dir = tmp_path / "run"
    config = _config(model_dir, npz, epochs=1, export=True)
    train_lib.train_and_evaluate(config)
    for marker in glob.glob(str(model_dir / "export" / "*.json")):
        os.remove(marker)  # as if killed before the export was complete
    assert not export.is_complete(str(model_dir / "export"))
    train_lib.train_and_evaluate(config)
    assert export.is_complete(str(model_dir / "export"))


def test_divergence_is_never_a_success(npz, tmp_path, monkeypatch):
    """The last update makes a weight NaN (its loss was still finite): no results, no export."""
    original = cohort_lib.Cohort.train_step
    calls = []

    def poisoned(self, images, labels, label_mask=None):
        out = original(self, images, labels, label_mask)
        calls.append(1)
        if len(calls) == 3:
            weight = self.models[1].trainable_variables[0]
            weight.assign(tf.fill(weight.shape, float("nan")))
        return out

    monkeypatch.setattr(cohort_lib.Cohort, "train_step", poisoned)
    model_dir = tmp_path / "run"
    with pytest.raises(UserError, match="peer 2's weights are not finite"):
        train_lib.train_and_evaluate(_config(model_dir, npz, epochs=1, export=True))
    assert not (model_dir / "results.json").exists() and not (model_dir / "export").exists()
    assert not glob.glob(os.path.join(_checkpoint_dir(model_dir), "ckpt-*.index"))


def test_on_nan_skip_with_an_absurd_learning_rate_is_no_result(npz, tmp_path):
    """Every non-finite update is dropped, yet the weights the first one left serve inf
    logits: no results.json (it would hold inf), no export, exit 2 (UserError)."""
    model_dir = tmp_path / "run"
    with pytest.raises(UserError, match="Training diverged"):
        train_lib.train_and_evaluate(_config(model_dir, npz, epochs=1, learning_rate=1e30,
                                             on_nan="skip", export=True))
    assert not (model_dir / "results.json").exists() and not (model_dir / "export").exists()
    assert json.loads((model_dir / "flags.json").read_text())["on_nan"] == "skip"


def _signal_during(monkeypatch, target, name, signum=signal.SIGTERM):
    original = getattr(target, name)

    def with_signal(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, with_signal)


def test_sigterm_during_evaluation_saves_and_resumes_to_the_same_results(npz, tmp_path, monkeypatch):
    reference = train_lib.train_and_evaluate(_config(tmp_path / "reference", npz))
    model_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _signal_during(patch, tasks.ClassificationTask, "evaluate")
        with pytest.raises(train_lib.Interrupted, match="SIGTERM: stopped while evaluating epoch 1") as e:
            train_lib.train_and_evaluate(_config(model_dir, npz))
    assert e.value.signum == signal.SIGTERM
    assert not (model_dir / "results.json").exists()
    results = train_lib.train_and_evaluate(_config(model_dir, npz))
    assert results.keys() == reference.keys()
    for key, value in reference.items():
        assert results[key] == pytest.approx(value, rel=1e-5), key


def test_sigint_during_export_is_honoured_and_the_export_is_whole(npz, tmp_path, monkeypatch):
    model_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _signal_during(patch, export, "export_cohort", signal.SIGINT)
        with pytest.raises(train_lib.Interrupted) as e:
            train_lib.train_and_evaluate(_config(model_dir, npz, epochs=1, export=True))
    assert e.value.signum == signal.SIGINT
    assert export.is_complete(str(model_dir / "export"))
