"""The bench's runs and their per-epoch TensorBoard scalars, for the plots and the diagnostics.

A bench folder (bench/cifar10_subset.py's --out_dir) holds one `<method>_seed<s>/` run folder
per method and seed; each run's event files hold, at the global step that closed each epoch,
`train/peer{k}/{top1,ce,mimicry,entropy,...}`, `lr/peer{k}` and the evaluation's
`test/peer{k}/...`, `test/ensemble/...`, `test/agreement`.
"""

import collections
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml_tf import quiet_start  # noqa: E402

_RUN = re.compile(r"^(?P<method>.+)_seed(?P<seed>\d+)$")


def find_runs(runs_dir):
    """{method: {seed: run folder}} of the `<method>_seed<s>/` folders under `runs_dir`."""
    runs = collections.defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(runs_dir, "*"))):
        match = _RUN.match(os.path.basename(path))
        if match and os.path.isdir(path):
            runs[match.group("method")][int(match.group("seed"))] = path
    return dict(runs)


def read_scalars(run_dir):
    """{tag: {epoch (from 1): value}} from a run's event files.

    Epochs are the ranks of the distinct steps at which anything was written (every epoch
    writes its training means at the step that closed it), so a tag written only at some
    epochs keeps their numbers. A resumed run has several event files and may repeat the
    epoch it was stopped in: files are read oldest first, so the later value is kept.
    """
    quiet_start.quiet()  # TensorFlow only to read the event files, without its start-up lines
    import tensorflow as tf  # noqa: PLC0415
    by_step = collections.defaultdict(dict)
    # The names hold the creation time in seconds (10 digits): sorted names are chronological.
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):  # summary_iterator's documented successor
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                number = (tf.make_ndarray(value.tensor) if value.HasField("tensor")
                          else value.simple_value)
                by_step[value.tag][event.step] = float(number)
    epoch_of = {step: epoch for epoch, step in enumerate(
        sorted({s for steps in by_step.values() for s in steps}), start=1)}
    return {tag: {epoch_of[s]: v for s, v in sorted(steps.items())} for tag, steps in by_step.items()}


def net_names(run_dir):
    """The run's networks, peer 1 first, from its flags.json (None where it has none)."""
    try:
        with open(os.path.join(run_dir, "flags.json")) as f:
            return list(json.load(f)["nets"])
    except (OSError, ValueError, KeyError):
        return None


def peers(scalars):
    """The peer numbers k that have `train/peer{k}/...` or `test/peer{k}/...` tags, in order."""
    found = {int(m.group(1)) for tag in scalars for m in [re.match(r"^\w+/peer(\d+)/", tag)] if m}
    return sorted(found)
