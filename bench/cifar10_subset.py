"""Real CIFAR-10 images on a CPU: methods side by side on one cohort, same budget.

Default: a ResNet-32 pair with `dml` vs `independent`; `--methods` and `--nets` choose others
(KDCL methods run with per-peer augmentation).

Trains on a real CIFAR-10 subset of 4,000 training and 1,000 test images, an .npz file
with uint8 `x_train` [N, 32, 32, 3], `y_train`, `x_test`, `y_test` (ours,
`cifar10_subset_train4000_test1000.npz`: the first 4,000 images of CIFAR-10's
`data_batch_1` and the first 1,000 of its `test_batch`, lossless), and
prints, per method, each peer's and the ensemble's test top-1 and each peer's mean
posterior entropy on the training set (paper Sec. 4.8: DML's is higher).

  .venv/bin/python bench/cifar10_subset.py --npz=PATH [--epochs=12] [--seeds=0,1,2]

--npz is required unless the environment variable DML_TF_CIFAR10_SUBSET holds the path.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml_tf import quiet_start  # noqa: E402

quiet_start.quiet()  # TensorFlow's start-up lines would open the bench's log, as in the run scripts

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from dml_tf import config as config_lib  # noqa: E402
from dml_tf import data as data_lib  # noqa: E402
from dml_tf import tasks  # noqa: E402
from dml_tf import losses, run_dir, train_lib  # noqa: E402
from dml_tf.data import pipeline  # noqa: E402

NPZ_VARIABLE = "DML_TF_CIFAR10_SUBSET"  # the --npz default, for machines that keep the file
flags.DEFINE_string("npz", os.environ.get(NPZ_VARIABLE), "The CIFAR-10 subset .npz (x_train, "
                    f"y_train, x_test, y_test); default: ${NPZ_VARIABLE}.")
flags.DEFINE_integer("epochs", 12, "Epochs per method.")
flags.DEFINE_float("learning_rate", 0.1, "Initial SGD (Nesterov 0.9) learning rate, the paper's "
                   "(with --warmup_epochs=0 its first steps blow up and a DML pair can collapse "
                   "to uniform predictions; earlier tables here used 0.02).")
flags.DEFINE_float("decay_at", 0.75, "Fraction of the epochs after which lr drops x0.1.")
flags.DEFINE_list("methods", ["independent", "dml"], "Methods to compare.")
flags.DEFINE_list("precisions", ["float32"], "--precision of each run (every method is run "
                  "in each), e.g. float32,mixed_bfloat16.")
flags.DEFINE_string("nets", "resnet32,resnet32", "The cohort.")
flags.DEFINE_string("update", "sequential", "Update order.")
flags.DEFINE_string("out_dir", "/tmp/dml_tf_bench_cifar10_subset", "Where the runs go.")
flags.DEFINE_list("seeds", ["0"], "Seeds: every method runs once per seed (the same seeds for "
                  "every method, so seed s of dml and of independent share initialisation and "
                  "data order); with several, the table gives mean ± std and the paired "
                  "differences of the methods against the first one.")
flags.DEFINE_float("warmup_epochs", 2.0, "Linear learning-rate warm-up (--warmup_epochs of the "
                   "run scripts; 0: off, as in the paper; the default 2 is a deviation that lets "
                   "lr 0.1 train stably on this budget).")
flags.DEFINE_string("teacher_checkpoint", None, "kd: the teacher run (its peer 1 is the teacher).")
FLAGS = flags.FLAGS


def load_subset(path):
    with np.load(path) as f:
        x_train, x_test = f["x_train"], f["x_test"]
        y_train, y_test = f["y_train"].astype(np.int64), f["y_test"].astype(np.int64)
    mean, std = data_lib.channel_stats(x_train)
    return data_lib.ImageData(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                              num_classes=10, mean=mean, std=std, name="cifar10_subset")


def train_entropy(cohort, data):
    """Mean posterior entropy (nats) of each peer over the un-augmented training set."""
    ds = pipeline.eval_dataset(data.x_train, data.y_train, data.mean, data.std, 500)
    totals = np.zeros(cohort.num_peers)
    for images, _ in ds:
        for k, logits in enumerate(cohort.predict_logits(images)):
            totals[k] += float(losses.entropy(logits)) * int(images.shape[0])
    return totals / len(data.x_train)


def run_one(data, method, precision, seed):
    """Trains (or, where its model_dir holds the finished run, restores) one method and seed."""
    cfg = config_lib.Config(
        # dataset "npz" at the file: `python -m dml_tf.analysis` can restore these runs.
        dataset="npz", data_dir=os.path.abspath(FLAGS.npz), nets=config_lib.parse_nets(FLAGS.nets),
        method=method, update=FLAGS.update, epochs=FLAGS.epochs, batch_size=64,
        learning_rate=FLAGS.learning_rate, lr_decay_rate=0.1,
        lr_decay_epochs=max(1, round(FLAGS.decay_at * FLAGS.epochs)),
        warmup_epochs=FLAGS.warmup_epochs, weight_decay=5e-4, seed=seed, eval_every_epochs=1,
        export=False,
        # KDCL's second ingredient: each peer sees its own augmentation of the batch.
        per_peer_augmentation=method.startswith("kdcl"),
        teacher_checkpoint=FLAGS.teacher_checkpoint if method == "kd" else None,
        precision=precision,
        model_dir=os.path.join(FLAGS.out_dir, f"{method}_{precision}_seed{seed}"
                               if precision != "float32" else f"{method}_seed{seed}"))
    # A finished run is restored, not retrained: its training time is kept beside it.
    seconds_file = os.path.join(cfg.model_dir, "bench_seconds.json")
    trained_before = os.path.exists(os.path.join(cfg.model_dir, "results.json"))
    started = time.time()
    cohort, results = train_lib.train_cohort(cfg, tasks.ClassificationTask(data))
    if trained_before and os.path.exists(seconds_file):
        with open(seconds_file) as f:
            seconds = json.load(f)["seconds"]
    else:
        seconds = time.time() - started
        run_dir.write_json_atomically(seconds_file, {"seconds": seconds})
    return results, train_entropy(cohort, data), seconds


def _mean_std(values, digits=2, sign=""):
    """'mean ± sample std' of the values (sign="+" for differences)."""
    values = np.asarray(values, float)
    text = f"{values.mean():{sign}.{digits}f}"
    return f"{text} ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else text


def print_tables(runs, k, seeds):
    """Per-seed rows, then per method mean ± std (sample std), then paired differences."""
    names = [f"peer{i}" for i in range(1, k + 1)] + ["ensemble"]

    def top1(results, name):
        return 100 * results[f"test/{name}/top1"]

    header = ["method", "seed"] + [f"{n} top1" for n in names] + [
        f"peer{i} entropy" for i in range(1, k + 1)] + ["minutes"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for (method, seed), (results, entropy, seconds) in runs.items():
        cells = [method, str(seed)] + [f"{top1(results, n):.2f}" for n in names]
        print("| " + " | ".join(cells + [f"{e:.4f}" for e in entropy] + [f"{seconds / 60:.1f}"]) + " |")
    methods = list(dict.fromkeys(m for m, _ in runs))
    if len(seeds) < 2:
        return
    print(f"\nMean ± std over seeds {', '.join(map(str, seeds))}:\n")
    header = ["method"] + [f"{n} top1" for n in names] + [f"peer{i} entropy" for i in range(1, k + 1)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for method in methods:
        cells = [method] + [_mean_std([top1(runs[method, s][0], n) for s in seeds]) for n in names]
        cells += [_mean_std([runs[method, s][1][i] for s in seeds], digits=4) for i in range(k)]
        print("| " + " | ".join(cells) + " |")
    base = methods[0]
    for method in methods[1:]:
        print(f"\nPaired difference {method} − {base}, top-1 points, per seed:\n")
        print("| " + " | ".join(["seed"] + names) + " |\n|" + "---|" * (len(names) + 1))
        diffs = {n: [top1(runs[method, s][0], n) - top1(runs[base, s][0], n) for s in seeds]
                 for n in names}
        for j, seed in enumerate(seeds):
            print("| " + " | ".join([str(seed)] + [f"{diffs[n][j]:+.2f}" for n in names]) + " |")
        print("| mean ± std | " + " | ".join(_mean_std(diffs[n], sign="+") for n in names) + " |")


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not FLAGS.npz:
        sys.exit(f"error: pass --npz at the CIFAR-10 subset .npz (or set {NPZ_VARIABLE}).")
    if not os.path.exists(FLAGS.npz):
        sys.exit(f"error: {FLAGS.npz} not found; pass --npz at cifar10_subset_train4000_test1000.npz.")
    data = load_subset(FLAGS.npz)
    seeds = [int(s) for s in FLAGS.seeds]
    runs = {}
    for precision in FLAGS.precisions:
        for seed in seeds:
            for method in FLAGS.methods:
                name = method if precision == "float32" else f"{method} ({precision})"
                runs[name, seed] = run_one(data, method, precision, seed)
    k = len(config_lib.parse_nets(FLAGS.nets))
    print(f"\nReal CIFAR-10 subset (4000 train / 1000 test), {FLAGS.nets}, {FLAGS.epochs} epochs, "
          f"lr {FLAGS.learning_rate} (warm-up {FLAGS.warmup_epochs} epochs, ×0.1 after "
          f"{max(1, round(FLAGS.decay_at * FLAGS.epochs))}), {FLAGS.update}, TF {tf.__version__}\n")
    print_tables(runs, k, seeds)


if __name__ == "__main__":
    app.run(main)
