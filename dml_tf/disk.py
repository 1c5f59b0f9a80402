"""A full disk while saving (a checkpoint, an export) as one sentence with the space needed.

Python's own writes fail with OSError(ENOSPC or EDQUOT); TensorFlow's writers (checkpoints,
SavedModels) turn the same errno into a ResourceExhaustedError whose message ends in the
system's text for it ("No space left on device"). Imports no TensorFlow.
"""

import errno
import os
import shutil

_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_full(error):
    """Whether `error` is a write refused because the file system (or the quota) is full."""
    if isinstance(error, OSError):
        return error.errno in _FULL
    # TensorFlow's OpError: matched by name, so that this module needs no TensorFlow import.
    if type(error).__name__ == "ResourceExhaustedError":
        return any(os.strerror(code) in str(error) for code in _FULL)
    return False


def size_of(paths):
    """Bytes the files at `paths` take on disk, folders counted with everything below them.

    A file takes whole blocks (4 kB on most file systems), and so does a folder, which
    matters for the many small files of a SavedModel.
    """
    total = 0
    for path in paths:
        if os.path.isdir(path):
            for folder, _, files in os.walk(path):
                total += _file_size(folder) + sum(_file_size(os.path.join(folder, name))
                                                  for name in files)
        else:
            total += _file_size(path)
    return total


def _file_size(path):
    try:
        stat = os.stat(path)
    except OSError:  # gone since it was listed (another process pruned it)
        return 0
    return max(stat.st_size, getattr(stat, "st_blocks", 0) * 512)


def free_bytes(path):
    """Bytes free to this user on the file system of `path` (or of its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human(num_bytes):
    """'12.3 MB' (decimal units, as `df -H` and file managers show them)."""
    if num_bytes < 1000:
        return f"{int(num_bytes)} bytes"
    value = float(num_bytes)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}"


def full_message(what, folder, needed):
    """The start of the sentence: what could not be written where, the space needed and free.

    Callers end it with what to do (and what is kept).
    """
    free = free_bytes(folder)
    free = f", {human(free)} free" if free is not None else ""
    return (f"The disk holding {folder} is full ({what} needs about {human(needed)}{free})")
