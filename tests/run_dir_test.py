"""The run folder's owner on its own: checks, the lock, --overwrite, kd's teacher run, no trace
of a refused run (no TensorFlow involved)."""

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
    dataset: str = "digits"
    nets: tuple = ("tiny", "tiny")
    teacher_checkpoint: str | None = None
    teacher_peer: int = 1

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
        run_dir.check(FakeConfig(str(folder), method="independent", seed=3))
    assert run_dir.check(FakeConfig(str(folder), method="independent", overwrite=True)) is True


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
    with run_dir.RunDir(FakeConfig(str(folder), method="independent", overwrite=True)):
        pass
    assert sorted(os.listdir(folder)) == sorted(users + ["plots", run_dir.LOCK_NAME])
    assert all((folder / name).read_text() == "mine" for name in users)


def test_refused_run_creates_nothing(tmp_path):
    folder = _previous_run(tmp_path / "run")
    before = sorted(os.listdir(folder))
    with pytest.raises(UserError):
        with run_dir.RunDir(FakeConfig(str(folder), method="independent")):
            pass
    assert sorted(os.listdir(folder)) == before


_HOLD = textwrap.dedent("""
    import dataclasses, json, sys, time
    sys.path.insert(0, {root!r})
    from dml_tf import run_dir

    @dataclasses.dataclass(frozen=True)
    class C:
        model_dir: str
        method: str = "dml"
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


@pytest.mark.parametrize("existing", [False, True])
def test_a_run_refused_inside_the_folder_leaves_nothing(tmp_path, existing):
    target = tmp_path / "runs" / "kd"
    if existing:  # a folder of the user's: only the lock the run took goes
        target.mkdir(parents=True)
        (target / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="damaged"):
        with run_dir.RunDir(FakeConfig(str(target))):
            assert (target / run_dir.LOCK_NAME).exists()
            raise UserError("--teacher_checkpoint=x is damaged.")  # as TensorFlow finds it
    if existing:
        assert sorted(os.listdir(target)) == ["notes.txt"]
    else:
        assert os.listdir(tmp_path) == []


def test_a_run_that_wrote_something_keeps_it_after_a_failure(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with run_dir.RunDir(FakeConfig(str(target))) as folder:
            folder.write_json("flags.json", {"model_dir": str(target)})
            raise RuntimeError("a crash in the first epoch")
    assert sorted(os.listdir(target)) == sorted(["flags.json", run_dir.LOCK_NAME])


def _teacher_run(folder, nets=("tiny", "resnet32"), dataset="digits", checkpoint=True):
    """A finished run's folder as the run scripts write it: flags.json, checkpoints/ckpt-N.*."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "flags.json").write_text(json.dumps(
        {"dataset": dataset, "nets": list(nets), "method": "independent",
         "model_dir": str(folder)}, indent=2, sort_keys=True))
    if checkpoint:
        (folder / "checkpoints" / "checkpoint").write_text(
            'model_checkpoint_path: "ckpt-6"\nall_model_checkpoint_paths: "ckpt-6"\n')
        for suffix in (".index", ".data-00000-of-00001"):
            (folder / "checkpoints" / f"ckpt-6{suffix}").write_bytes(b"\0")
    return folder


def _kd(tmp_path, teacher, **fields):
    return FakeConfig(str(tmp_path / "kd"), method="kd", nets=("tiny", "tiny"),
                      teacher_checkpoint=None if teacher is None else str(teacher), **fields)


@pytest.mark.parametrize("teacher, fields, words", [
    (None, {}, r"^--method=kd distils from a fixed teacher: pass --teacher_checkpoint"),
    ("nowhere", {}, r"^--teacher_checkpoint=.*nowhere does not exist"),
    ("no_flags", {}, r"^--teacher_checkpoint=.*no_flags holds no flags\.json"),
    ("no_checkpoint", {}, r"^--teacher_checkpoint=.*no_checkpoint holds no checkpoint"),
    ("teacher", {"teacher_peer": 3},
     r"^--teacher_peer=3 is beyond the 2 peers of the teacher run .*\(tiny, resnet32\); pass a "
     r"number from 1 to 2\.$"),
    ("teacher", {"teacher_peer": 2},
     r"^--teacher_checkpoint=.* holds peer2 = resnet32, but this run's teacher \(peer 1, the "
     r"first of --nets\) is tiny"),
    ("cifar10_teacher", {}, r"^--teacher_checkpoint=.* holds a peer1 trained on "
                            r"--dataset=cifar10, not on this run's digits"),
])
def test_a_teacher_run_no_kd_run_can_use_is_refused_creating_nothing(tmp_path, teacher, fields,
                                                                     words):
    _teacher_run(tmp_path / "teacher")
    _teacher_run(tmp_path / "cifar10_teacher", dataset="cifar10")
    _teacher_run(tmp_path / "no_checkpoint", checkpoint=False)
    (tmp_path / "no_flags" / "checkpoints").mkdir(parents=True)
    (tmp_path / "no_flags" / "checkpoints" / "ckpt-1.index").write_bytes(b"\0")
    config = _kd(tmp_path, teacher and tmp_path / teacher, **fields)
    with pytest.raises(UserError, match=words):
        run_dir.check(config)
    with pytest.raises(UserError, match=words):
        with run_dir.RunDir(config):
            pass
    assert not (tmp_path / "kd").exists()


@pytest.mark.parametrize("where", ["checkpoints", "checkpoints/ckpt-6", ""])
def test_a_teacher_is_named_by_its_run_its_checkpoints_or_a_prefix(tmp_path, where):
    teacher = _teacher_run(tmp_path / "teacher") / where
    assert run_dir.check(_kd(tmp_path, teacher)) is False
    with pytest.raises(UserError, match="does not exist"):
        run_dir.check(_kd(tmp_path, tmp_path / "teacher" / "checkpoints" / "ckpt-7"))


def test_a_resumed_kd_run_does_not_read_its_teacher_again(tmp_path):
    kd = _kd(tmp_path, tmp_path / "moved_away")
    (tmp_path / "kd" / "checkpoints").mkdir(parents=True)
    (tmp_path / "kd" / "flags.json").write_text(kd.to_json())
    with pytest.raises(UserError, match="does not exist"):  # nothing to resume yet
        run_dir.check(kd)
    (tmp_path / "kd" / "checkpoints" / "ckpt-3.index").write_bytes(b"\0")
    assert run_dir.check(kd) is False
