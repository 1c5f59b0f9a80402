"""Cohort step speed on the CPU: mimicry overhead, update orders, cohort size, input pipeline.

Prints a markdown table of median step times (alternating the compared variants, so that
machine noise hits both) for ResNet-32 peers on CIFAR shapes, batch 64, SGD Nesterov,
through dml_tf's public API:

  .venv/bin/python bench/cohort_speed.py [--repeats=5] [--steps=10] [--max_peers=5]
      [--parts=mimicry,orders,size,pipeline]
"""


import timing
from absl import app, flags

flags.DEFINE_integer("repeats", 5, "Alternating timing rounds per variant (median reported).")
flags.DEFINE_integer("steps", 10, "Timed steps per round.")
flags.DEFINE_integer("max_peers", 5, "Largest cohort.")
flags.DEFINE_list("parts", ["mimicry", "orders", "size", "pipeline"],
                  "What to measure: mimicry overhead, update orders, cohort size, input pipeline.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("intra_op_threads", 0, "As the run scripts' flag (0: TensorFlow's choice).")
flags.DEFINE_integer("inter_op_threads", 0, "As the run scripts' flag (0: TensorFlow's choice).")
FLAGS = flags.FLAGS


def make_cohort(num_peers, method, update):
    return timing.make_cohort(num_peers, "resnet32", method, update)


def timer(cohort, batches):
    """Seconds per step over `FLAGS.steps` steps drawn from `batches` (after a warm-up step)."""
    return timing.seconds_per_step(cohort, batches, FLAGS.steps)


def real_pipeline(batch_size):
    """Random uint8 images through dml_tf's training pipeline (decode-free arrays:
    normalise, pad-and-crop, flip, shuffle, batch, prefetch), new seed each epoch."""
    import numpy as np

    from dml_tf.data import pipeline

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
    times = timing.alternate(lambda name: timer(cohorts[name], batches_for(name)), list(cohorts),
                             FLAGS.repeats)
    return {name: timing.median(t) for name, t in times.items()}


def main(argv):
    del argv
    import tensorflow as tf

    timing.set_threads(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    b = FLAGS.batch_size
    rows = []
    memory = timing.in_memory_batches(b)
    if "mimicry" in FLAGS.parts:
        t = compare({"dml": lambda: make_cohort(2, "dml", "simultaneous"),
                     "independent": lambda: make_cohort(2, "independent", "simultaneous")},
                    lambda name: memory)
        rows.append(("mimicry overhead, K=2 simultaneous: dml / independent",
                     t["dml"] / t["independent"], "<= 1.05",
                     f"{t['dml'] * 1e3:.0f} vs {t['independent'] * 1e3:.0f} ms"))
    if "orders" in FLAGS.parts:
        for k in range(2, FLAGS.max_peers + 1):
            t = compare({"sequential": lambda k=k: make_cohort(k, "dml", "sequential"),
                         "simultaneous": lambda k=k: make_cohort(k, "dml", "simultaneous")},
                        lambda name: memory)
            rows.append((f"update orders, K={k}: sequential / simultaneous",
                         t["sequential"] / t["simultaneous"], "<= 1.4 (K=2)",
                         f"{t['sequential'] * 1e3:.0f} vs {t['simultaneous'] * 1e3:.0f} ms"))
    if "size" in FLAGS.parts:
        # Every cohort size in the same alternating rounds, so that drifts hit all alike.
        sizes = range(2, FLAGS.max_peers + 1)
        t = compare({k: lambda k=k: make_cohort(k, "dml", "simultaneous") for k in sizes},
                    lambda name: memory)
        for k in sizes:
            rows.append((f"cohort size, K={k}: simultaneous step per peer / K=2's",
                         t[k] / k / (t[2] / 2), "<= 1.10", f"{t[k] / k * 1e3:.0f} ms per peer"))
    if "pipeline" in FLAGS.parts:
        streams = {"pipeline": real_pipeline(b), "memory": memory}
        t = compare({"pipeline": lambda: make_cohort(2, "dml", "simultaneous"),
                     "memory": lambda: make_cohort(2, "dml", "simultaneous")},
                    lambda name: streams[name])
        rows.append(("input pipeline: images/s through tf.data / in memory",
                     t["memory"] / t["pipeline"], ">= 0.95",
                     f"{b / t['pipeline']:.0f} vs {b / t['memory']:.0f} img/s"))
    threads = (tf.config.threading.get_intra_op_parallelism_threads(),
               tf.config.threading.get_inter_op_parallelism_threads())
    print(f"\nResNet-32 peers, CIFAR-100 shapes, batch {b}, SGD Nesterov, {timing.machine()}, "
          f"intra/inter-op threads {threads} (0: TensorFlow's choice), median of "
          f"{FLAGS.repeats} alternating rounds x {FLAGS.steps} steps")
    print("| measure | ratio | target | detail |\n|---|---|---|---|")
    for name, ratio, target, detail in rows:
        print(f"| {name} | {ratio:.3f} | {target} | {detail} |")


if __name__ == "__main__":
    app.run(main)
