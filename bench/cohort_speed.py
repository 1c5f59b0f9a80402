"""Cohort step speed on the CPU: mimicry overhead, update orders, cohort size, input pipeline.

Prints a markdown table of median step times (alternating the compared variants, so that
machine noise hits both) for ResNet-32 peers on CIFAR shapes, batch 64, SGD Nesterov,
through dml_tf's public API:

  .venv/bin/python bench/cohort_speed.py [--repeats=5] [--steps=10] [--max_peers=5]
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from dml_tf import methods, nets  # noqa: E402
from dml_tf.cohort import Cohort  # noqa: E402
from dml_tf.data import pipeline  # noqa: E402

flags.DEFINE_integer("repeats", 5, "Alternating timing rounds per variant (median reported).")
flags.DEFINE_integer("steps", 10, "Timed steps per round.")
flags.DEFINE_integer("max_peers", 5, "Largest cohort.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
FLAGS = flags.FLAGS


def make_cohort(num_peers, method, update):
    keras.utils.set_random_seed(0)
    models = [nets.build("resnet32", 100, (32, 32, 3), name=f"peer{k}") for k in range(1, num_peers + 1)]
    opts = [keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True) for _ in models]
    return Cohort(models, opts, methods.get(method), update, weight_decay=5e-4)


def timer(cohort, batches):
    """Seconds per step over `FLAGS.steps` steps drawn from `batches` (after a warm-up step)."""
    images, labels = next(batches)
    cohort.train_step(images, labels)["peer1/total"].numpy()
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        images, labels = next(batches)
        out = cohort.train_step(images, labels)
    out["peer1/total"].numpy()
    return (time.perf_counter() - start) / FLAGS.steps


def in_memory(batch_size):
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(batch_size, 32, 32, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, 100, batch_size), tf.int64)
    while True:
        yield images, labels


def real_pipeline(batch_size):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10 * batch_size * 20, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, len(x)).astype(np.int64)
    seed = 0
    while True:
        for batch in pipeline.train_dataset(x, y, (125.0,) * 3, (60.0,) * 3, batch_size, seed=seed):
            yield batch
        seed += 1


def compare(variants, batches_for):
    """Median seconds/step of each named variant, rounds alternating between variants."""
    cohorts = {name: make() for name, make in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(FLAGS.repeats):
        for name, cohort in cohorts.items():
            times[name].append(timer(cohort, batches_for(name)))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv):
    del argv
    b = FLAGS.batch_size
    rows = []
    memory = in_memory(b)
    t = compare({"dml": lambda: make_cohort(2, "dml", "simultaneous"),
                 "independent": lambda: make_cohort(2, "independent", "simultaneous")},
                lambda name: memory)
    rows.append(("mimicry overhead, K=2 simultaneous: dml / independent", t["dml"] / t["independent"],
                 "<= 1.05", f"{t['dml'] * 1e3:.0f} vs {t['independent'] * 1e3:.0f} ms"))
    base = None
    for k in range(2, FLAGS.max_peers + 1):
        t = compare({"sequential": lambda k=k: make_cohort(k, "dml", "sequential"),
                     "simultaneous": lambda k=k: make_cohort(k, "dml", "simultaneous")},
                    lambda name: memory)
        rows.append((f"update orders, K={k}: sequential / simultaneous",
                     t["sequential"] / t["simultaneous"], "<= 1.4 (K=2)",
                     f"{t['sequential'] * 1e3:.0f} vs {t['simultaneous'] * 1e3:.0f} ms"))
        per_peer = t["simultaneous"] / k
        base = base or per_peer
        rows.append((f"cohort size, K={k}: step per peer / K=2's", per_peer / base, "<= 1.10",
                     f"{per_peer * 1e3:.0f} ms per peer"))
    streams = {"pipeline": real_pipeline(b), "memory": memory}
    t = compare({"pipeline": lambda: make_cohort(2, "dml", "simultaneous"),
                 "memory": lambda: make_cohort(2, "dml", "simultaneous")},
                lambda name: streams[name])
    rows.append(("input pipeline: images/s through tf.data / in memory", t["memory"] / t["pipeline"],
                 ">= 0.95", f"{b / t['pipeline']:.0f} vs {b / t['memory']:.0f} img/s"))
    print(f"\nResNet-32 peers, CIFAR-100 shapes, batch {b}, SGD Nesterov, TF {tf.__version__}, "
          f"{os.cpu_count()} CPUs, median of {FLAGS.repeats} alternating rounds x {FLAGS.steps} steps")
    print("| measure | ratio | target | detail |\n|---|---|---|---|")
    for name, ratio, target, detail in rows:
        print(f"| {name} | {ratio:.3f} | {target} | {detail} |")


if __name__ == "__main__":
    app.run(main)
