"""The run folder (`--model_dir`): checked before anything starts, owned by one process at a
time, and only the run's own files are ever replaced.

Imports nothing heavy: the run scripts call `check` before TensorFlow loads, so a mistake
about the folder (or about the teacher run a kd run reads) is reported in a second. `RunDir`
is what train_lib holds for the life of a run: the lock, `--overwrite`, atomic JSON writes,
and no trace left by a run refused after it took the folder.
"""

import errno
import fcntl
import fnmatch
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
import time

from dml_tf import choices
from dml_tf import config as config_lib
from dml_tf.errors import UserError

LOCK_NAME = ".dml_tf.lock"
# What runs (and analysis) write into a model_dir, so what --overwrite may remove; anything
# else there (the user's notes, a dataset passed as --data_dir) is never touched.
RUN_FILES = ("flags.json", "results.json", "analysis.json", "checkpoints", "export")
RUN_PATTERNS = ("events.out.tfevents.*", "analysis_*.png", "analysis_*.md", "*.json.tmp",
                "export.tmp-*",
                "export.old-*", "worker_scratch_*")
# Config fields that may change between a run and its resumption (the settings table's).
RESUMABLE_CHANGES = config_lib.resumable_settings()
# The longest name a run writes below model_dir (a checkpoint's temporary shard while saving).
_LONGEST_RUN_PATH = "checkpoints/ckpt-9999999999_temp/part-00000-of-00001.data-00000-of-00001.tempstate0000000000000000000"


def check(config):
    """Refuses, in one sentence, a run whose folders no run can use; creates nothing.

    Its --model_dir: a file, a path under a file, a name too long for the filesystem, a folder
    that cannot be written, a folder in use by a running process, a malformed flags.json, or a
    run of another configuration (unless --overwrite). For a method that distils from a
    teacher run (kd) starting afresh, that run as well (`check_teacher`).

    Returns:
      True when the folder holds a previous run that --overwrite is to replace.
    """
    replace = _check_model_dir(config)
    resuming = not replace and _checkpoint_files(os.path.join(config.model_dir, "checkpoints"))
    if config.method in choices.TEACHER_METHODS and not resuming:
        check_teacher(config)  # a resumed run restores its teacher from its own checkpoint
    return replace


def _check_model_dir(config):
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


def check_teacher(config):
    """Refuses, in one sentence and without TensorFlow, a --teacher_checkpoint a kd run cannot
    distil from: none given, a path that does not exist, no run's flags.json or no checkpoint
    there, a --teacher_peer beyond that run's peers, or a teacher of another network (the
    first of --nets) or another --dataset, all read from the teacher run's flags.json.

    What only TensorFlow can see (a damaged checkpoint, another class count within a dataset)
    is train_lib's to refuse.
    """
    path = config.teacher_checkpoint
    if not path:
        raise UserError(f"--method={config.method} distils from a fixed teacher: pass "
                        "--teacher_checkpoint at the teacher run's --model_dir.")
    run, checkpoint = _teacher_run(path)
    if not checkpoint:
        raise UserError(f"--teacher_checkpoint={path} holds no checkpoint; point it at a "
                        "finished run's --model_dir.")
    teacher_nets = run.get("nets")
    k = config.teacher_peer
    if not isinstance(teacher_nets, list) or not teacher_nets:
        raise UserError(f"--teacher_checkpoint={path}: its run's flags.json names no --nets; "
                        "point it at a run that a run script (run_cifar.py, ...) wrote.")
    if k > len(teacher_nets):
        raise UserError(f"--teacher_peer={k} is beyond the {len(teacher_nets)} peers of the "
                        f"teacher run {path} ({', '.join(map(str, teacher_nets))}); pass a "
                        f"number from 1 to {len(teacher_nets)}.")
    if teacher_nets[k - 1] != config.nets[0]:
        raise UserError(f"--teacher_checkpoint={path} holds peer{k} = {teacher_nets[k - 1]}, but "
                        f"this run's teacher (peer 1, the first of --nets) is {config.nets[0]}; "
                        f"list {teacher_nets[k - 1]} first in --nets, or pick the teacher run's "
                        f"peer of {config.nets[0]} with --teacher_peer.")
    if run.get("dataset", config.dataset) != config.dataset:
        raise UserError(f"--teacher_checkpoint={path} holds a peer{k} trained on --dataset="
                        f"{run['dataset']}, not on this run's {config.dataset}; distil from a "
                        f"teacher run on {config.dataset}.")


def _teacher_run(path):
    """(flags.json of the run --teacher_checkpoint names, whether a checkpoint is there).

    `path` is a run's folder, its checkpoints/ folder, or a checkpoint prefix in either.
    """
    if os.path.isdir(path):
        folders = [path, os.path.dirname(os.path.normpath(path))]
        checkpoint = _checkpoint_files(os.path.join(path, "checkpoints")) or \
            _checkpoint_files(path)
    elif glob.glob(glob.escape(path) + ".*"):
        folders = [os.path.dirname(path), os.path.dirname(os.path.dirname(path))]
        checkpoint = os.path.exists(path + ".index")
    else:
        raise UserError(f"--teacher_checkpoint={path} does not exist; point it at the teacher "
                        "run's --model_dir.")
    for folder in folders:
        flags_path = os.path.join(folder or ".", "flags.json")
        if os.path.isfile(flags_path):
            try:
                return _load_json_object(flags_path), checkpoint
            except (OSError, ValueError) as e:
                raise UserError(f"{flags_path} is not a run's configuration ({str(e)[:80]}); "
                                "point --teacher_checkpoint at a run that finished.") from None
    raise UserError(f"--teacher_checkpoint={path} holds no flags.json (the teacher run's "
                    "configuration); point it at the --model_dir of a run the run scripts wrote.")


def _checkpoint_files(folder):
    """Whether `folder` holds a checkpoint (a TensorFlow checkpoint's .index file)."""
    return bool(glob.glob(os.path.join(glob.escape(folder), "*.index")))


def _load_json_object(path):
    with open(path) as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


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
        return _load_json_object(flags_path)
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
    RUN_PATTERNS only). On exit: the lock released; after an exception (a run refused once it
    held the folder, e.g. a teacher checkpoint TensorFlow cannot read), also the lock file and
    the folders it created, as long as the run wrote nothing there, so a refused run leaves
    nothing behind.
    """

    def __init__(self, config, owner=True):
        self.config = config
        self.path = config.model_dir
        self.owner = owner and _writes_folder(config)
        self._lock_fd = None
        self._created = []  # the folders __enter__ made, outermost first
        self._created_lock = False

    def __enter__(self):
        replace = check(self.config)
        self._created = _missing_folders(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise UserError(f"--model_dir={self.path} cannot be created ({e.strerror}); pass a "
                            "folder you can write to.") from None
        if self.owner:
            self._created_lock = not os.path.exists(self.join(LOCK_NAME))
            self._lock_fd = _acquire_lock(self.path)
            if replace:
                self.remove_run_files()
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None and not _holds_run_files(self.path):
            self._remove_traces()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _remove_traces(self):
        """Removes the lock file and the folders this run created, which held nothing else."""
        if self._created_lock and self._lock_fd is not None:
            # Unlinked while still held: no other process can take a lock file about to vanish.
            os.remove(self.join(LOCK_NAME))
        for folder in reversed(self._created):
            try:
                os.rmdir(folder)  # only an empty folder: never anything the run did not make
            except OSError:
                break

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


def _missing_folders(path):
    """The folders of `path` that do not exist yet, outermost first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.insert(0, path)
        path = os.path.dirname(path)
    return missing


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
