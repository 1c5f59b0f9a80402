"""A full disk during a checkpoint save or an export: one sentence with the space needed, and
nothing already written lost. Injected faults, and a real full file system where one can be
mounted (a tmpfs in a user namespace)."""

import errno
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from dml_tf import checkpoints, disk
from dml_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model():
    inputs = keras.Input((5,))
    return keras.Model(inputs, keras.layers.Dense(3)(inputs))  # 5*3 + 3 = 18 float32


def _checkpoint(model):
    return tf.train.Checkpoint(peer1=model, epoch=tf.Variable(0, dtype=tf.int64))


def _fill_temp_and_fail(error):
    """A Checkpoint._write that leaves a half-written temporary folder, as a full disk does."""

    def write(file_prefix, *args, **kwargs):
        temp = file_prefix + "_temp"
        os.makedirs(temp, exist_ok=True)
        with open(os.path.join(temp, "part-00000-of-00001.data-00000-of-00001.tempstate1"), "wb") as f:
            f.write(b"\0" * 50)
        raise error

    return write


def _du(paths):
    """Bytes the files take on disk, as `du` counts them (whole blocks)."""
    out = subprocess.run(["du", "-c", "-B1", *paths], capture_output=True, text=True, check=True)
    return int(out.stdout.splitlines()[-1].split()[0])


def _files(directory):
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory))}


FULL_ERRORS = {
    "tensorflow": tf.errors.ResourceExhaustedError(
        None, None, "/x/ckpt-5_temp/part-00000-of-00001.data-00000-of-00001.tempstate1; No space "
        "left on device [Op:SaveV2]"),
    "python": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "quota": OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
}


@pytest.mark.parametrize("kind", list(FULL_ERRORS))
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_how_much_space(tmp_path, monkeypatch,
                                                                           kind):
    directory = str(tmp_path / "checkpoints")
    model = _model()
    checkpoint = _checkpoint(model)
    manager = checkpoints.manager(checkpoint, directory)
    assert checkpoints.save(manager, 3) == os.path.join(directory, "ckpt-3")
    before = _files(directory)
    size = _du([os.path.join(directory, k) for k in before if k.startswith("ckpt-3.")])
    monkeypatch.setattr(checkpoint, "_write", _fill_temp_and_fail(FULL_ERRORS[kind]))
    with pytest.raises(UserError) as raised:
        checkpoints.save(manager, 5)
    message = str(raised.value)
    free = disk.human(shutil.disk_usage(directory).free)
    assert 1000 < size < 100_000  # so the message shows kilobytes, to one decimal
    assert message.startswith(f"The disk holding {directory} is full (checkpoint ckpt-5 needs "
                              f"about {size / 1000:.1f} kB, {free} free)")
    assert message.count(". ") == 0
    assert message.endswith("; free that much space there and run the same command to resume "
                            "from ckpt-3, which is kept.")
    assert _files(directory) == before  # the half-written ckpt-5_temp is gone, nothing else moved
    restored = _model()
    checkpoints.restore_newest_intact(_checkpoint(restored), directory)
    for a, b in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_full_disk_at_the_first_save_estimates_from_the_variables(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    checkpoint = _checkpoint(_model())
    manager = checkpoints.manager(checkpoint, directory)
    monkeypatch.setattr(checkpoint, "_write", _fill_temp_and_fail(FULL_ERRORS["python"]))
    with pytest.raises(UserError) as raised:
        checkpoints.save(manager, 1)
    # 18 float32 weights, the int64 epoch and the int64 save_counter the manager adds.
    assert f"(checkpoint ckpt-1 needs about {18 * 4 + 8 + 8} bytes, " in str(raised.value)
    assert str(raised.value).endswith("and run the same command to start again.")
    assert os.listdir(directory) == []


def test_other_save_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    checkpoint = _checkpoint(_model())
    manager = checkpoints.manager(checkpoint, str(tmp_path))
    for error in (OSError(errno.EACCES, "Permission denied"), OSError("disk full"),
                  tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")):
        monkeypatch.setattr(checkpoint, "_write", _fill_temp_and_fail(error))
        with pytest.raises(type(error)):
            checkpoints.save(manager, 1)


def test_sizes_and_units():
    assert [disk.human(n) for n in (0, 999, 1000, 12_345_678, 4 * 10**12)] == [
        "0 bytes", "999 bytes", "1.0 kB", "12.3 MB", "4.0 TB"]
    assert disk.is_full(OSError(errno.ENOSPC, "x")) and not disk.is_full(ValueError("No space"))


_REAL = r"""
import os, sys
import keras
import tensorflow as tf
from dml_tf import checkpoints, cohort as cohort_lib, export, methods, nets
from dml_tf.errors import UserError
folder = sys.argv[1]
models = [nets.build("tiny", 5, (16, 16, 3)) for _ in range(2)]
cohort = cohort_lib.Cohort(models, [keras.optimizers.SGD(0.1) for _ in models], methods.get("dml"))
manager = checkpoints.manager(tf.train.Checkpoint(peer1=models[0], peer2=models[1]),
                              os.path.join(folder, "checkpoints"))
checkpoints.save(manager, 1)
export.export_cohort(cohort, os.path.join(folder, "export"), source="ckpt-1")
free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
with open(os.path.join(folder, "filler"), "wb") as f:  # leave 20 kB: less than a checkpoint
    f.write(b"\0" * (free - 20_000))
for name, action in (("checkpoint", lambda: checkpoints.save(manager, 2)),
                     ("export", lambda: export.export_cohort(cohort, os.path.join(folder, "export"),
                                                             source="ckpt-2"))):
    try:
        action()
        print(name, "saved")
    except UserError as e:
        print(name, "error:", e)
print("kept:", sorted(os.listdir(os.path.join(folder, "checkpoints"))),
      export.is_complete(os.path.join(folder, "export"), "ckpt-1"))
"""


def test_a_real_full_file_system(tmp_path):
    """A 3 MB tmpfs mounted in a user namespace (skipped where the system allows none)."""
    mount = tmp_path / "small"
    mount.mkdir()
    script = tmp_path / "real.py"
    script.write_text(_REAL)
    command = (f"mount -t tmpfs -o size=3m tmpfs {mount} && "
               f"{sys.executable} {script} {mount}")
    try:
        run = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True,
                             text=True, timeout=300, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"))
    except FileNotFoundError:
        pytest.skip("no unshare command")
    if "mount" in run.stderr and run.returncode != 0 and "Traceback" not in run.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()[:100]}")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"checkpoint error: The disk holding {mount}/checkpoints is full "
                               "(checkpoint ckpt-2 needs about ")
    assert lines[0].endswith("resume from ckpt-1, which is kept.")
    assert lines[1].startswith(f"export error: The disk holding {mount} is full (the export "
                               "needs about ")
    assert lines[1].endswith(f"(the previous export in {mount}/export is kept).")
    assert lines[2] == "kept: ['checkpoint', 'ckpt-1.data-00000-of-00001', 'ckpt-1.index'] True"
