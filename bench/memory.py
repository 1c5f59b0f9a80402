"""Peak resident memory of training a cohort, and how it grows with the cohort size.

Each configuration trains a few steps (DML, simultaneous and sequential, SGD Nesterov,
CIFAR-100 shapes, batch 64, tensors in memory) in its own process and reports that
process's peak resident set size (getrusage), and the same peak minus the process's
resident memory just before the cohort is built (TensorFlow and Keras loaded, nothing
else), which is what the cohort itself costs.

  .venv/bin/python bench/memory.py [--configs=resnet32:2,resnet32:3,...] [--steps=3]
"""

import json
import sys

import timing
from absl import app, flags

flags.DEFINE_list("configs", ["resnet32:2", "resnet32:3", "resnet32:4", "resnet32:5",
                              "wrn28_10:2", "wrn28_10:3"],
                  "net:peers pairs to measure.")
flags.DEFINE_list("updates", ["simultaneous", "sequential"], "Update orders to measure.")
flags.DEFINE_integer("steps", 3, "Training steps per process.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_string("precision", "float32", "--precision of the cohort.")
flags.DEFINE_string("worker", None, "Internal: net:peers:update to measure in this process.")
FLAGS = flags.FLAGS


def measure(spec):
    import tensorflow as tf

    net, peers, update = spec.split(":")
    float(tf.constant(1.0) + 1.0)  # TensorFlow's runtime started: part of the baseline
    baseline = _current_rss_mb()
    cohort = timing.make_cohort(int(peers), net, "dml", update, precision=FLAGS.precision)
    seconds = timing.seconds_per_step(cohort, timing.in_memory_batches(FLAGS.batch_size),
                                      FLAGS.steps, warmup=1)
    return {"peak_mb": timing.peak_rss_mb(), "baseline_mb": baseline, "step_s": seconds}


def _current_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv):
    del argv
    if FLAGS.worker:
        print(json.dumps(measure(FLAGS.worker)))
        return
    rows = []
    for config in FLAGS.configs:
        for update in FLAGS.updates:
            spec = f"{config}:{update}"
            result = timing.run_worker(__file__, [
                f"--worker={spec}", f"--steps={FLAGS.steps}", f"--batch_size={FLAGS.batch_size}",
                f"--precision={FLAGS.precision}"])
            print(f"{spec}: {result}", file=sys.stderr)
            rows.append((spec, result))
    print(f"\nPeak resident memory, DML, batch {FLAGS.batch_size}, {FLAGS.precision}, "
          f"{timing.machine()}")
    print("| network | peers | update | peak RSS (MB) | cohort's share (MB) | per peer (MB) | "
          "s/step |\n|---|---|---|---|---|---|---|")
    for spec, r in rows:
        net, peers, update = spec.split(":")
        share = r["peak_mb"] - r["baseline_mb"]
        print(f"| {net} | {peers} | {update} | {r['peak_mb']:.0f} | {share:.0f} | "
              f"{share / int(peers):.0f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    app.run(main)
