"""Per-epoch test and training top-1 of bench runs, from their TensorBoard events.

  .venv/bin/python bench/plot_curves.py --runs_dir=/tmp/dml_tf_bench_cifar10_subset \
      --out=bench/cifar10_subset_curves.png

Reads every `<method>_seed<s>/` run folder under --runs_dir (as bench/cifar10_subset.py
writes them) and draws two panels: each peer's `test/peer{k}/top1` per epoch, and its
`train/peer{k}/top1` (the mean over the epoch's augmented training batches, as the peer
trained). One colour per method; solid: peer 1, dashed: peer 2, ...; the line is the mean
over seeds, with the seeds' range shaded. Peers are labelled with their networks (from the
runs' flags.json) when these differ.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_events  # noqa: E402

flags.DEFINE_string("runs_dir", "/tmp/dml_tf_bench_cifar10_subset", "Folder of the runs.")
flags.DEFINE_string("out", "bench/cifar10_subset_curves.png", "PNG to write.")
flags.DEFINE_string("title", "", "Plot title (default: the runs' folder).")
FLAGS = flags.FLAGS

PANELS = (("test/peer{k}/top1", "test top-1 (%)"), ("train/peer{k}/top1", "training top-1 (%)"))
_STYLES = ["-", "--", ":", "-."]


def read_runs(runs_dir):
    """{method: {seed: {tag: {epoch: value}}}} and the peers' labels, for the runs under runs_dir."""
    found = run_events.find_runs(runs_dir)
    runs = {m: {s: run_events.read_scalars(d) for s, d in seeds.items()} for m, seeds in found.items()}
    nets = {tuple(run_events.net_names(d) or ()) for seeds in found.values() for d in seeds.values()}
    labels = {}
    if len(nets) == 1 and len(set(next(iter(nets)))) > 1:  # one heterogeneous cohort
        labels = {k: f"peer {k} ({net})" for k, net in enumerate(next(iter(nets)), start=1)}
    return runs, labels


def _draw(ax, runs, tag, labels):
    import numpy as np  # noqa: PLC0415
    for i, (method, seeds) in enumerate(sorted(runs.items())):
        colour = f"C{i}"
        for k in sorted({k for s in seeds.values() for k in run_events.peers(s)}):
            curves = [s.get(tag.format(k=k), {}) for s in seeds.values()]
            epochs = sorted(set.intersection(*[set(c) for c in curves]))
            if not epochs:
                continue
            values = np.array([[100 * c[e] for e in epochs] for c in curves])
            ax.plot(epochs, values.mean(axis=0), _STYLES[(k - 1) % 4], color=colour,
                    label=f"{method}, {labels.get(k, f'peer {k}')}")
            if len(seeds) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=colour,
                                alpha=0.15, linewidth=0)


def main(argv):
    del argv
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib import ticker  # noqa: PLC0415

    runs, labels = read_runs(FLAGS.runs_dir)
    if not runs:
        sys.exit(f"error: no <method>_seed<s> runs under --runs_dir={FLAGS.runs_dir}.")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for ax, (tag, ylabel) in zip(axes, PANELS):
        _draw(ax, runs, tag, labels)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    seeds = sorted({s for per_method in runs.values() for s in per_method})
    title = (f"mean of seeds {', '.join(map(str, seeds))}, range shaded" if len(seeds) > 1
             else f"seed {seeds[0]}")
    axes[1].legend(fontsize=8, title=title, title_fontsize=8)
    fig.suptitle(FLAGS.title or os.path.basename(os.path.normpath(FLAGS.runs_dir)), fontsize=10)
    fig.tight_layout()
    fig.savefig(FLAGS.out)
    print(f"Wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
