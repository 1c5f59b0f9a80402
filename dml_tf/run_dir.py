"""The run folder (`--model_dir`): checked before anything starts, owned by one process at a
time, and only the run's own files are ever replaced.

Imports nothing heavy: the run scripts call `check` before TensorFlow loads, so a mistake
about the folder is reported in a second. `RunDir` is what train_lib holds for the life of a
run: the lock, `--overwrite`, and atomic JSON writes.
"""

import errno
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import sys
import tempfile
import time

from dml_tf import config as config_lib
from dml_tf.errors import UserError

LOCK_NAME = ".dml_tf.lock"
# What runs (and analysis) write into a model_dir, so what --overwrite may remove; anything
# else there (the user's notes, a dataset passed as --data_dir) is never touched.
RUN_FILES = ("flags.json", "results.json", "analysis.json", "checkpoints", "export")
RUN_PATTERNS = ("events.out.tfevents.*", "analysis_*.png", "*.json.tmp", "export.tmp-*",
                "export.old-*", "worker_scratch_*")
# Config fields that may change between a run and its resumption (the settings table's).
RESUMABLE_CHANGES = config_lib.resumable_settings()
# The longest name a run writes below model_dir (a checkpoint's temporary shard while saving).
_LONGEST_RUN_PATH = "checkpoints/ckpt-9999999999_temp/part-00000-of-00001.data-00000-of-00001.tempstate0000000000000000000"


def check(config):
    """Refuses, in one sentence, a --model_dir no run can use; creates nothing.

    A file, a path under a file, a name too long for the filesystem, a folder that cannot be
    written, a folder in use by a running process, a malformed flags.json, or a run of another
    configuration (unless --overwrite).

    Returns:
      True when the folder holds a previous run that --overwrite is to replace.
    """
    path = config.model_dir
    if not path or not str(path).strip():
        raise UserError("--model_dir is empty; name the run's output folder.")
    _check_path(path)
    if not os.path.isdir(path):
        return False
    if _writes_folder(config):
        holder = lock_holder(path)
        if holder:
            raise UserError(f"--model_dir={path} is in use by {holder}; wait for that run to end "
                            "or pass another --model_dir.")
    previous = _read_flags(path, config.overwrite)
    if previous is None:
        return config.overwrite and _holds_run_files(path)
    changed = changed_settings(previous, json.loads(config.to_json()))
    if changed and not config.overwrite:
        raise UserError(
            f"--model_dir={path} holds a run with different {', '.join(changed)} (see its "
            "flags.json); pass a new --model_dir, or --overwrite to replace that run.")
    return bool(changed)


def changed_settings(previous, current):
    """Names of the settings, other than RESUMABLE_CHANGES, that differ between two flags.json."""
    return sorted(k for k in current if k not in RESUMABLE_CHANGES
                  and k in previous and previous[k] != current[k])


def _check_path(path):
    path = os.path.abspath(path)
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if ancestor != path and not os.path.isdir(ancestor):
        raise UserError(f"--model_dir={path} lies under {ancestor}, which is a file; pass a folder path.")
    if ancestor == path and not os.path.isdir(path):
        raise UserError(f"--model_dir={path} is a file; pass a folder path.")
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
        path_max = os.pathconf(ancestor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    longest = max(path.split(os.sep), key=len)
    if len(longest.encode()) > name_max:
        raise UserError(f"--model_dir has a name of {len(longest.encode())} bytes, more than this "
                        f"filesystem's {name_max}; choose a shorter name.")
    if len(os.path.join(path, _LONGEST_RUN_PATH).encode()) >= path_max:
        raise UserError(f"--model_dir={path[:60]}... is too long for this filesystem's paths "
                        f"({path_max} bytes with the run's own files); choose a shorter one.")
    try:  # a real write: permissions, read-only mounts and full disks all show here
        with tempfile.TemporaryFile(dir=ancestor, prefix=".dml_tf_probe"):
            pass
    except OSError as e:
        raise UserError(f"--model_dir={path} cannot be written ({ancestor}: {e.strerror}); "
                        "pass a folder you can write to.") from None


def _read_flags(path, overwrite):
    """The folder's previous flags.json, None if it has none (or an unreadable one to replace)."""
    flags_path = os.path.join(path, "flags.json")
    if not os.path.exists(flags_path):
        return None
    try:
        with open(flags_path) as f:
            previous = json.load(f)
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
        return previous
    except (OSError, ValueError) as e:
        if overwrite:
            return None
        raise UserError(f"{flags_path} is not a run's configuration ({str(e)[:80]}); move it away, "
                        "or pass --overwrite to replace the run in that folder.") from None


def _holds_run_files(path):
    return any(_is_run_file(name) for name in os.listdir(path))


def _is_run_file(name):
    return name in RUN_FILES or any(fnmatch.fnmatch(name, p) for p in RUN_PATTERNS)


def _writes_folder(config):
    """Whether this process writes model_dir (not a multi-worker run's non-chief worker)."""
    if config.distribution != "multi_worker":
        return True
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    except ValueError:
        return True  # distribute.make_strategy reports a malformed TF_CONFIG
    task = tf_config.get("task", {})
    if "chief" in tf_config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0


def lock_holder(path):
    """'process N on HOST (started …, command …)' if a live process holds path's lock, else None.

    The lock is an flock(2) on model_dir/.dml_tf.lock: the kernel drops it when its process
    dies, however it dies, so a stale lock of a killed run never blocks the next one.
    """
    lock_path = os.path.join(path, LOCK_NAME)
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return _describe_holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe_holder(fd):
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        info = {}
    return (f"process {info.get('pid', '?')} on {info.get('host', '?')} (started "
            f"{info.get('started', '?')}: {info.get('command', '?')[:120]})")


class RunDir:
    """Owns config.model_dir for the life of a run (a context manager).

    On entry: the checks of `check`, the folder created, its lock taken (chief only, in
    multi-worker runs), and with --overwrite the previous run's files removed (RUN_FILES and
    RUN_PATTERNS only). On exit: the lock released.
    """

    def __init__(self, config, owner=True):
        self.config = config
        self.path = config.model_dir
        self.owner = owner and _writes_folder(config)
        self._lock_fd = None

    def __enter__(self):
        replace = check(self.config)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise UserError(f"--model_dir={self.path} cannot be created ({e.strerror}); pass a "
                            "folder you can write to.") from None
        if self.owner:
            self._lock_fd = _acquire_lock(self.path)
            if replace:
                self.remove_run_files()
        return self

    def __exit__(self, *exc):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def join(self, *names):
        return os.path.join(self.path, *names)

    def remove_run_files(self):
        """Removes what a run wrote here (never other files), e.g. for --overwrite."""
        removed = []
        for name in sorted(os.listdir(self.path)):
            if _is_run_file(name):
                _remove(self.join(name))
                removed.append(name)
        if removed:
            print(f"--overwrite: removed the previous run's {', '.join(removed)} from {self.path}.")

    def write_json(self, name, obj):
        """Writes strict JSON (no NaN or Infinity) through a renamed temporary file.

        Raises:
          ValueError: obj holds a non-finite number (it would not be valid JSON).
        """
        write_json_atomically(self.join(name), obj)


def write_json_atomically(path, obj):
    """Strict JSON in a temporary file, flushed to disk, then renamed over `path`."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _acquire_lock(path):
    """Takes model_dir's lock and records who holds it; UserError if a live process has it."""
    lock_path = os.path.join(path, LOCK_NAME)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _describe_holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"--model_dir={path} is in use by {holder}; wait for that run to end "
                            "or pass another --model_dir.") from None
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd
