"""The run folder's owner on its own: checks, the lock, --overwrite (no TensorFlow involved)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from dml_tf import run_dir
from dml_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    """The fields run_dir reads of a Config."""

    model_dir: str
    method: str = "dml"
    seed: int = 0
    epochs: int = 2
    overwrite: bool = False
    distribution: str = "none"

    def to_json(self):
        return json.dumps(dataclasses.asdict(self))


def _previous_run(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flags.json").write_text(FakeConfig(str(folder), **fields).to_json())
    return folder


def test_a_fresh_folder_passes_and_is_not_created(tmp_path):
    target = tmp_path / "a" / "b"
    assert run_dir.check(FakeConfig(str(target))) is False
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("make, words", [
    (lambda p: (p / "file").write_text("x") and p / "file", "is a file"),
    (lambda p: (p / "file").write_text("x") and p / "file" / "run", "which is a file"),
    (lambda p: p / ("n" * 300), "shorter name"),
    (lambda p: p.joinpath(*["d" * 200] * 21), "too long"),
    (lambda p: "/sys/kernel/dml_tf_run", "cannot be written"),
    (lambda p: "", "--model_dir is empty"),
])
def test_unusable_folders_are_one_sentence(tmp_path, make, words):
    with pytest.raises(UserError, match=words):
        run_dir.check(FakeConfig(str(make(tmp_path))))


def test_malformed_flags_json_is_named_and_overwrite_replaces_it(tmp_path):
    (tmp_path / "flags.json").write_text("{not json")
    with pytest.raises(UserError, match="flags.json is not a run's configuration"):
        run_dir.check(FakeConfig(str(tmp_path)))
    (tmp_path / "flags.json").write_text("")
    with pytest.raises(UserError, match="flags.json"):
        run_dir.check(FakeConfig(str(tmp_path)))
    assert run_dir.check(FakeConfig(str(tmp_path), overwrite=True)) is True


def test_another_configuration_needs_overwrite_resumable_changes_do_not(tmp_path):
    folder = _previous_run(tmp_path / "run")
    assert run_dir.check(FakeConfig(str(folder), epochs=5)) is False  # resumable change
    with pytest.raises(UserError, match="different method, seed"):
        run_dir.check(FakeConfig(str(folder), method="kd", seed=3))
    assert run_dir.check(FakeConfig(str(folder), method="kd", overwrite=True)) is True


def test_overwrite_removes_only_what_runs_write(tmp_path):
    folder = _previous_run(tmp_path / "run")
    run_files = ["results.json", "events.out.tfevents.1.host", "analysis.json",
                 "analysis_noise.png", "results.json.tmp"]
    for name in run_files:
        (folder / name).write_text("run")
    for name in ("checkpoints", "export", "export.tmp-123"):
        (folder / name).mkdir()
        (folder / name / "inner").write_text("run")
    users = ["notes.txt", "data.npz", "export.txt", "my_results.json"]
    for name in users:
        (folder / name).write_text("mine")
    (folder / "plots").mkdir()
    (folder / "plots" / "fig.png").write_text("mine")
    with run_dir.RunDir(FakeConfig(str(folder), method="kd", overwrite=True)):
        pass
    assert sorted(os.listdir(folder)) == sorted(users + ["plots", run_dir.LOCK_NAME])
    assert all((folder / name).read_text() == "mine" for name in users)


def test_refused_run_creates_nothing(tmp_path):
    folder = _previous_run(tmp_path / "run")
    before = sorted(os.listdir(folder))
    with pytest.raises(UserError):
        with run_dir.RunDir(FakeConfig(str(folder), method="kd")):
            pass
    assert sorted(os.listdir(folder)) == before


_HOLD = textwrap.dedent("""
    import dataclasses, json, sys, time
    sys.path.insert(0, {root!r})
    from dml_tf import run_dir

    @dataclasses.dataclass(frozen=True)
    class C:
        model_dir: str
        overwrite: bool = False
        distribution: str = "none"
        def to_json(self):
            return json.dumps({{"model_dir": self.model_dir}})

    with run_dir.RunDir(C({folder!r})):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_second_process_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD.format(root=ROOT, folder=str(folder))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by process {holder.pid} on .*wait for that run"):
            run_dir.check(FakeConfig(str(folder)))
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            with run_dir.RunDir(FakeConfig(str(folder))):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up of the lock file by its owner
        holder.wait()
    assert (folder / run_dir.LOCK_NAME).exists()
    assert run_dir.check(FakeConfig(str(folder))) is False
    with run_dir.RunDir(FakeConfig(str(folder))) as owned:
        assert json.loads((folder / run_dir.LOCK_NAME).read_text())["pid"] == os.getpid()
        assert owned.owner


def test_non_chief_workers_share_the_chiefs_folder(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    chief = FakeConfig(str(folder), distribution="multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    with run_dir.RunDir(chief):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                    "task": {"type": "worker", "index": 1}}))
        with run_dir.RunDir(chief) as worker:
            assert not worker.owner


def test_json_is_strict_and_atomic(tmp_path):
    path = tmp_path / "results.json"
    run_dir.write_json_atomically(str(path), {"a": 0.5})
    with pytest.raises(ValueError):
        run_dir.write_json_atomically(str(path), {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 0.5}
