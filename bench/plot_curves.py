"""Per-epoch test top-1 curves of bench runs, from their TensorBoard events.

  .venv/bin/python bench/plot_curves.py --runs_dir=/tmp/dml_tf_bench_cifar10_subset \
      --out=bench/cifar10_subset_curves.png

Reads every `<method>_seed<s>/` run folder under --runs_dir (as bench/cifar10_subset.py
writes them), and draws, per method (one colour each), the mean over seeds of each peer's
`test/peer{k}/top1` per epoch (solid: peer 1, dashed: peer 2, ...), with the seeds' range
shaded.
"""

import collections
import glob
import os
import re
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("runs_dir", "/tmp/dml_tf_bench_cifar10_subset", "Folder of the runs.")
flags.DEFINE_string("out", "bench/cifar10_subset_curves.png", "PNG to write.")
flags.DEFINE_string("title", "", "Plot title (default: the runs' folder).")
FLAGS = flags.FLAGS

_RUN = re.compile(r"^(?P<method>.+)_seed(?P<seed>\d+)$")
_TAG = re.compile(r"^test/peer(?P<k>\d+)/top1$")


def read_curves(run_dir):
    """{peer k: {epoch (from 1): top-1}} from a run's event files, in order of steps."""
    import tensorflow as tf  # noqa: PLC0415 (only for reading the event files)
    by_step = collections.defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                match = _TAG.match(value.tag)
                if match:
                    number = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
                    by_step[int(match.group("k"))][event.step] = float(number)
    return {k: {epoch: steps[s] for epoch, s in enumerate(sorted(steps), start=1)}
            for k, steps in by_step.items()}


def main(argv):
    del argv
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    runs = collections.defaultdict(dict)  # method -> seed -> curves
    for run_dir in sorted(glob.glob(os.path.join(FLAGS.runs_dir, "*"))):
        match = _RUN.match(os.path.basename(run_dir))
        if match and os.path.isdir(run_dir):
            runs[match.group("method")][int(match.group("seed"))] = read_curves(run_dir)
    if not runs:
        sys.exit(f"error: no <method>_seed<s> runs under --runs_dir={FLAGS.runs_dir}.")
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    styles = ["-", "--", ":", "-."]
    for i, (method, seeds) in enumerate(sorted(runs.items())):
        colour = plt.get_cmap("tab10")(i)
        peers = sorted({k for curves in seeds.values() for k in curves})
        for k in peers:
            epochs = sorted(set.intersection(*[set(c.get(k, {})) for c in seeds.values()]))
            values = np.array([[100 * c[k][e] for e in epochs] for c in seeds.values()])
            ax.plot(epochs, values.mean(axis=0), styles[(k - 1) % 4], color=colour, marker="o",
                    markersize=3, label=f"{method}, peer {k} (mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
            if len(seeds) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=colour,
                                alpha=0.12, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(FLAGS.title or os.path.basename(os.path.normpath(FLAGS.runs_dir)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FLAGS.out)
    print(f"Wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
