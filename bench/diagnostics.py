"""Per-epoch diagnostics of bench runs, from their TensorBoard events: why the methods differ.

  .venv/bin/python bench/diagnostics.py --runs_dir=/tmp/dml_tf_bench_cifar10_subset \
      [--at_epochs=1,12,24,48,72,80] [--fit_threshold=0.99]

Reads every `<method>_seed<s>/` run folder under --runs_dir (as bench/cifar10_subset.py
writes them) and prints, per method, a markdown table with one row per epoch (all, or
--at_epochs), each number the mean over the method's seeds that reached that epoch:
"next lr", the learning rate logged after the epoch (`lr/peer1`, the schedule's value at
the summary's step, so the one the next epoch starts with: the epoch before a drop shows
the new value); per peer the training top-1 (%, the mean over the epoch's augmented
batches as the peer trained), the training cross-entropy, the mimicry term (the method's
KL to its peers, as trained; "–" where the method logs none), the mean posterior entropy of
its training predictions (nats); per peer the test top-1 (%); and the peers' agreement on the
test set (%, `test/agreement`: the fraction of test images on which they predict the same
class). Then one line per run: from which epoch every peer's training top-1 stays at or above
--fit_threshold, and the minutes the bench recorded for it.
"""

import json
import math
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_events  # noqa: E402

flags.DEFINE_string("runs_dir", "/tmp/dml_tf_bench_cifar10_subset", "Folder of the runs.")
flags.DEFINE_list("at_epochs", [], "Epochs to show (default: every epoch).")
flags.DEFINE_float("fit_threshold", 0.99, "Training top-1 (a fraction) that counts as fitted.")
FLAGS = flags.FLAGS

# (column, tag, scale, digits); "{k}" columns repeat per peer.
PEER_COLUMNS = (("train top1", "train/peer{k}/top1", 100, 2), ("CE", "train/peer{k}/ce", 1, 4),
                ("mimicry", "train/peer{k}/mimicry", 1, 4),
                ("entropy", "train/peer{k}/entropy", 1, 4),
                ("test top1", "test/peer{k}/top1", 100, 2))
COHORT_COLUMNS = (("next lr", "lr/peer1", 1, 5), ("agreement", "test/agreement", 100, 2))


def columns(num_peers):
    """[(header, tag, scale, digits)] of the table: lr, the peer columns, agreement."""
    per_peer = [(f"peer{k} {name}", tag.format(k=k), scale, digits)
                for name, tag, scale, digits in PEER_COLUMNS for k in range(1, num_peers + 1)]
    return [COHORT_COLUMNS[0], *per_peer, COHORT_COLUMNS[1]]


def epoch_rows(per_seed, cols, at_epochs=None):
    """[(epoch, [mean over seeds or nan per column])], over the epochs any seed reached."""
    epochs = sorted({e for scalars in per_seed for values in scalars.values() for e in values})
    if at_epochs:
        epochs = [e for e in epochs if e in set(at_epochs)]
    rows = []
    for epoch in epochs:
        cells = []
        for _, tag, scale, _ in cols:
            values = [s[tag][epoch] for s in per_seed if epoch in s.get(tag, {})]
            cells.append(scale * float(np.mean(values)) if values else math.nan)
        rows.append((epoch, cells))
    return rows


def fitted_from(scalars, num_peers, threshold):
    """First epoch from which every peer's training top-1 stays >= threshold (None: never)."""
    curves = [scalars.get(f"train/peer{k}/top1", {}) for k in range(1, num_peers + 1)]
    epochs = sorted(set.intersection(*[set(c) for c in curves])) if curves else []
    first = None
    for epoch in epochs:
        fitted = all(c[epoch] >= threshold for c in curves)
        first = (first or epoch) if fitted else None
    return first


def print_method(method, per_seed, num_peers, at_epochs, nets=None):
    """The method's table; `nets` (peer 1 first) are named in its title when they differ."""
    cols = columns(num_peers)
    seeds = ", ".join(map(str, sorted(per_seed)))
    named = "".join(f"; peer {k} {net}" for k, net in enumerate(nets or [], start=1)
                    if len(set(nets)) > 1)
    print(f"\n{method} (mean over seeds {seeds}{named}):\n")
    print("| " + " | ".join(["epoch"] + [c[0] for c in cols]) + " |\n|" + "---|" * (len(cols) + 1))
    for epoch, cells in epoch_rows(list(per_seed.values()), cols, at_epochs):
        text = ["–" if math.isnan(v) else f"{v:.{c[3]}f}" for v, c in zip(cells, cols)]
        print("| " + " | ".join([str(epoch)] + text) + " |")


def run_line(method, seed, run_dir, scalars, num_peers, threshold):
    """One sentence on a run: its epochs, when it fitted the training set, its minutes."""
    last = max((e for values in scalars.values() for e in values), default=0)
    train = [scalars.get(f"train/peer{k}/top1", {}).get(last) for k in range(1, num_peers + 1)]
    final = " / ".join("?" if v is None else f"{100 * v:.2f}" for v in train)
    first = fitted_from(scalars, num_peers, threshold)
    fit = (f"every peer's training top-1 >= {100 * threshold:g} % from epoch {first}" if first
           else f"training top-1 never stayed >= {100 * threshold:g} % for every peer")
    try:
        with open(os.path.join(run_dir, "bench_seconds.json")) as f:
            minutes = f"{json.load(f)['seconds'] / 60:.1f} minutes"
    except (OSError, ValueError, KeyError):
        minutes = "minutes not recorded"
    return f"- {method} seed {seed}: {last} epochs, {fit}; last epoch's training top-1 {final} %; {minutes}."


def main(argv):
    del argv
    runs = run_events.find_runs(FLAGS.runs_dir)
    if not runs:
        sys.exit(f"error: no <method>_seed<s> runs under --runs_dir={FLAGS.runs_dir}.")
    try:
        at_epochs = [int(e) for e in FLAGS.at_epochs]
    except ValueError:
        sys.exit(f"error: --at_epochs={','.join(FLAGS.at_epochs)} must be whole epoch numbers.")
    scalars = {m: {s: run_events.read_scalars(d) for s, d in seeds.items()} for m, seeds in runs.items()}
    lines = []
    for method, per_seed in scalars.items():
        num_peers = max(len(run_events.peers(s)) for s in per_seed.values())
        nets = run_events.net_names(next(iter(runs[method].values())))
        print_method(method, per_seed, num_peers, at_epochs, nets)
        lines += [run_line(method, seed, runs[method][seed], s, num_peers, FLAGS.fit_threshold)
                  for seed, s in sorted(per_seed.items())]
    print("\nRuns:\n\n" + "\n".join(lines))


if __name__ == "__main__":
    app.run(main)
