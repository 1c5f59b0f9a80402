"""Checkpoints you can lose a file of.

A run resumes from the checkpoint files themselves, not only from CheckpointManager's state
file (`checkpoints/checkpoint`): with that file missing or garbled, the newest `ckpt-N` on
disk is used; a damaged newest checkpoint (truncated data, bad index, missing shard) is named,
moved to `checkpoints/damaged/` (kept, never deleted), and the newest intact one is used
instead. Only when checkpoint files exist but none loads does the run refuse to start: it
never trains from scratch over a run's checkpoints. A save that finds the disk full (`save`)
is one sentence with the space it needs, and the checkpoints already written stay.

TensorFlow is imported by the functions that use it: dml_tf.report lists a run's checkpoints
(`prefixes`) without starting it.
"""

import glob
import os
import re
import shutil

import numpy as np

from dml_tf import disk
from dml_tf.errors import UserError

_INDEX = re.compile(r"ckpt-(\d+)\.index$")
MAX_TO_KEEP = 3


def number(prefix):
    """The N of a `.../ckpt-N` prefix (train_lib saves under the global step), or None."""
    match = _INDEX.search(os.path.basename(prefix) + ".index")
    return int(match.group(1)) if match else None


def prefixes(directory):
    """The checkpoint prefixes found on disk in `directory`, newest (highest number) first."""
    found = {}
    for index in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index")):
        match = _INDEX.search(os.path.basename(index))
        if match:
            found[int(match.group(1))] = index[:-len(".index")]
    return [found[n] for n in sorted(found, reverse=True)]


def _holds_checkpoint_files(directory):
    return bool(glob.glob(os.path.join(glob.escape(directory), "ckpt-*")))


def remove_temporaries(directory):
    """Removes the `*_temp` folders a save killed half-way leaves (never a valid checkpoint)."""
    for temp in glob.glob(os.path.join(glob.escape(directory), "*_temp")):
        shutil.rmtree(temp, ignore_errors=True)


def _reason(error):
    return str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__


def restore_newest_intact(checkpoint, directory, *, quarantine=True):
    """Restores `checkpoint` from the newest checkpoint in `directory` that loads completely.

    Args:
      checkpoint: a tf.train.Checkpoint of the run's objects.
      directory: the run's checkpoints/ folder (may not exist).
      quarantine: move damaged checkpoints to directory/damaged/ (a training run; analysis
        only reads).

    Returns:
      The restored prefix, or None where the folder holds no checkpoint (a fresh run).

    Raises:
      UserError: checkpoint files exist but none of them loads.
    """
    if not os.path.isdir(directory):
        return None
    remove_temporaries(directory)
    damaged = []
    for prefix in prefixes(directory):
        try:
            checkpoint.restore(prefix).assert_existing_objects_matched()
        # A damaged file fails in many ways (DataLossError, NotFoundError, IndexError from a
        # truncated read, AssertionError from missing objects): any of them means "not intact".
        except Exception as e:  # noqa: BLE001
            damaged.append((prefix, _reason(e)))
            continue
        if damaged:
            _report_damage(damaged, prefix, directory, quarantine)
        _repair_state(directory, prefix)
        return prefix
    if damaged or _holds_checkpoint_files(directory):
        detail = f" (newest, {os.path.basename(damaged[0][0])}: {damaged[0][1]})" if damaged else ""
        raise UserError(f"{directory} holds checkpoint files but none loads{detail}; pass "
                        "--overwrite to start this run again, or restore the files.")
    return None


def _report_damage(damaged, restored, directory, quarantine):
    names = ", ".join(f"{os.path.basename(p)} ({why})" for p, why in damaged)
    where = ""
    if quarantine:
        target = os.path.join(directory, "damaged")
        os.makedirs(target, exist_ok=True)
        for prefix, _ in damaged:
            for path in glob.glob(glob.escape(prefix) + ".*"):
                os.replace(path, os.path.join(target, os.path.basename(path)))
        where = f" (moved to {target})"
    print(f"Damaged checkpoint {names}{where}; resuming from the newest intact one, "
          f"{os.path.basename(restored)}.")


def _repair_state(directory, restored):
    """Rewrites the state file when it does not name `restored` as the latest checkpoint, so
    that CheckpointManager numbers and prunes the checkpoints actually on disk."""
    import tensorflow as tf
    try:
        state = tf.train.get_checkpoint_state(directory)
    except Exception:  # noqa: BLE001 (a garbled state file raises parser errors of any kind)
        state = None
    if state is not None and os.path.basename(state.model_checkpoint_path) == os.path.basename(restored):
        return
    if state is None:
        print(f"{os.path.join(directory, 'checkpoint')} was missing or unreadable; resuming from "
              f"the checkpoint files themselves ({os.path.basename(restored)}).")
    intact = [p for p in reversed(prefixes(directory))]
    intact = intact[max(0, intact.index(restored) + 1 - MAX_TO_KEEP):intact.index(restored) + 1]
    tf.compat.v1.train.update_checkpoint_state(directory, restored,
                                               all_model_checkpoint_paths=intact)


def manager(checkpoint, directory):
    """The run's CheckpointManager (the last MAX_TO_KEEP checkpoints kept)."""
    import tensorflow as tf
    return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=MAX_TO_KEEP)


def save(manager, checkpoint_number):
    """`manager.save(checkpoint_number=...)`, where a full disk is one sentence.

    A save that fails leaves the checkpoints already written and the state file as they were
    (CheckpointManager renames a complete temporary folder into place and prunes old
    checkpoints only afterwards); its half-written temporary folder is removed, since it only
    takes the space the next attempt needs.

    Returns:
      The new checkpoint's prefix.

    Raises:
      UserError: the disk (or the quota) holding manager.directory is full.
    """
    directory = manager.directory
    try:
        return manager.save(checkpoint_number=checkpoint_number)
    except Exception as e:  # noqa: BLE001 (TensorFlow's writers raise OpError, Python's OSError)
        if not disk.is_full(e):
            raise
    remove_temporaries(directory)
    newest = prefixes(directory)
    needed = (disk.size_of(glob.glob(glob.escape(newest[0]) + ".*")) if newest
              else _variable_bytes(manager.checkpoint))
    kept = (f"run the same command to resume from {os.path.basename(newest[0])}, which is kept"
            if newest else "run the same command to start again")
    raise UserError(f"{disk.full_message(f'checkpoint ckpt-{checkpoint_number}', directory, needed)}"
                    f"; free that much space there and {kept}.")


def _variable_bytes(checkpoint):
    """Bytes of the variables `checkpoint` saves (the size of a first checkpoint, roughly)."""
    import keras
    import tensorflow as tf
    seen, total = set(), 0
    for trackable in tf.train.TrackableView(checkpoint).descendants():
        if isinstance(trackable, (tf.Variable, keras.Variable)) and id(trackable) not in seen:
            seen.add(id(trackable))
            dtype = tf.as_dtype(trackable.dtype)
            if dtype != tf.string:  # a few bytes of bookkeeping (epoch_means), not counted
                total += int(np.prod(tuple(trackable.shape))) * dtype.size
    return total


def position(prefix):
    """Where training was when the checkpoint `prefix` (of train_lib.make_checkpoint) was saved.

    Read from the checkpoint file itself, without building a cohort.

    Returns:
      dict with "name" ("ckpt-N"), "step" (N, the global step), "epoch" (epochs completed),
      "step_in_epoch" (steps done into the next epoch) and "closed" (whether the epoch-end
      work, evaluation included, was done for this position).
    """
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)

    def value(name):
        return reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")

    return {"name": os.path.basename(prefix), "step": number(prefix), "epoch": int(value("epoch")),
            "step_in_epoch": int(value("step_in_epoch")), "closed": bool(value("closed"))}
