"""Real CIFAR-10 images on a CPU: methods side by side on one cohort, same budget.

Default: a ResNet-32 pair with `dml` vs `independent`; `--methods` and `--nets` choose others
(KDCL methods run with per-peer augmentation).

Trains on a real CIFAR-10 subset of 4,000 training and 1,000 test images, an .npz file
with uint8 `x_train` [N, 32, 32, 3], `y_train`, `x_test`, `y_test` (ours,
`cifar10_subset_train4000_test1000.npz`: the first 4,000 images of CIFAR-10's
`data_batch_1` and the first 1,000 of its `test_batch`, lossless), and
prints, per method, each peer's and the ensemble's test top-1 and each peer's mean
posterior entropy on the training set (paper Sec. 4.8: DML's is higher).

  .venv/bin/python bench/cifar10_subset.py --npz=PATH [--epochs=8]

--npz is required unless the environment variable DML_TF_CIFAR10_SUBSET holds the path.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from dml_tf import config as config_lib  # noqa: E402
from dml_tf import data as data_lib  # noqa: E402
from dml_tf import tasks  # noqa: E402
from dml_tf import losses, train_lib  # noqa: E402
from dml_tf.data import pipeline  # noqa: E402

NPZ_VARIABLE = "DML_TF_CIFAR10_SUBSET"  # the --npz default, for machines that keep the file
flags.DEFINE_string("npz", os.environ.get(NPZ_VARIABLE), "The CIFAR-10 subset .npz (x_train, "
                    f"y_train, x_test, y_test); default: ${NPZ_VARIABLE}.")
flags.DEFINE_integer("epochs", 8, "Epochs per method.")
flags.DEFINE_float("learning_rate", 0.02, "Initial SGD (Nesterov 0.9) learning rate (the paper's "
                   "0.1 is for 200 epochs; on a few epochs ResNet-32 peers at >= 0.05 spend "
                   "them recovering from the first steps' blow-up).")
flags.DEFINE_float("decay_at", 0.75, "Fraction of the epochs after which lr drops x0.1.")
flags.DEFINE_list("methods", ["independent", "dml"], "Methods to compare.")
flags.DEFINE_list("precisions", ["float32"], "--precision of each run (every method is run "
                  "in each), e.g. float32,mixed_bfloat16.")
flags.DEFINE_string("nets", "resnet32,resnet32", "The cohort.")
flags.DEFINE_string("update", "sequential", "Update order.")
flags.DEFINE_string("out_dir", "/tmp/dml_tf_bench_cifar10_subset", "Where the runs go.")
flags.DEFINE_integer("seed", 0, "Seed.")
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


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not FLAGS.npz:
        sys.exit(f"error: pass --npz at the CIFAR-10 subset .npz (or set {NPZ_VARIABLE}).")
    if not os.path.exists(FLAGS.npz):
        sys.exit(f"error: {FLAGS.npz} not found; pass --npz at cifar10_subset_train4000_test1000.npz.")
    data = load_subset(FLAGS.npz)
    rows = []
    for method, precision in [(m, p) for m in FLAGS.methods for p in FLAGS.precisions]:
        cfg = config_lib.Config(
            # dataset "npz" at the file: `python -m dml_tf.analysis` can restore these runs.
            dataset="npz", data_dir=os.path.abspath(FLAGS.npz), nets=config_lib.parse_nets(FLAGS.nets), method=method,
            update=FLAGS.update, epochs=FLAGS.epochs, batch_size=64,
            learning_rate=FLAGS.learning_rate, lr_decay_rate=0.1,
            lr_decay_epochs=max(1, round(FLAGS.decay_at * FLAGS.epochs)), weight_decay=5e-4,
            seed=FLAGS.seed, eval_every_epochs=FLAGS.epochs, export=False,
            # KDCL's second ingredient: each peer sees its own augmentation of the batch.
            per_peer_augmentation=method.startswith("kdcl"),
            teacher_checkpoint=FLAGS.teacher_checkpoint if method == "kd" else None,
            precision=precision,
            model_dir=os.path.join(FLAGS.out_dir, f"{method}_{precision}_seed{FLAGS.seed}"
                                   if precision != "float32" else f"{method}_seed{FLAGS.seed}"))
        started = time.time()
        cohort, results = train_lib.train_cohort(cfg, tasks.ClassificationTask(data))
        name = method if precision == "float32" else f"{method} ({precision})"
        rows.append((name, results, train_entropy(cohort, data), time.time() - started))
    k = len(config_lib.parse_nets(FLAGS.nets))
    header = ["method"] + [f"peer{i} top1" for i in range(1, k + 1)] + ["ensemble top1"] + [
        f"peer{i} entropy" for i in range(1, k + 1)] + ["minutes"]
    print(f"\nReal CIFAR-10 subset (4000 train / 1000 test), {FLAGS.nets}, {FLAGS.epochs} epochs, "
          f"{FLAGS.update}, seed {FLAGS.seed}, TF {tf.__version__}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method, results, entropy, seconds in rows:
        cells = [method] + [f"{100 * results[f'test/peer{i}/top1']:.2f}" for i in range(1, k + 1)]
        cells += [f"{100 * results['test/ensemble/top1']:.2f}"] + [f"{e:.4f}" for e in entropy]
        cells += [f"{seconds / 60:.1f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
