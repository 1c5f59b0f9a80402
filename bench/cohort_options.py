"""Speed options of the cohort step, each against the default, on this machine.

A DML pair of ResNet-32 peers (CIFAR-100 shapes, batch 64, simultaneous update, SGD
Nesterov) on tensors in memory, once per option, each in its own process (environment
variables and thread pools are fixed when TensorFlow starts). Options: --precision,
--jit_compile (XLA), Keras' own (unfused) BatchNormalization instead of dml_tf's fused
one, oneDNN switches, thread counts. Rounds alternate the order; medians are reported.

  .venv/bin/python bench/cohort_options.py [--rounds=3] [--steps=20]
"""

import json
import sys

import timing
from absl import app, flags

flags.DEFINE_integer("rounds", 3, "Alternating rounds (one process per option each).")
flags.DEFINE_integer("steps", 20, "Timed steps per process, after the warm-up.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (tracing, XLA compilation).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_list("only", None, "Time only the options whose names start with one of these "
                  "(the default is always timed, as the reference).")
flags.DEFINE_string("worker", None, "Internal: the option to time in this process.")
FLAGS = flags.FLAGS

# name -> (environment, cohort options, (intra_op, inter_op) threads; 0: TensorFlow's)
OPTIONS = {
    "default (float32, fused BN, TF threads, oneDNN on as in the run scripts)": ({}, {}, (0, 0)),
    "--precision=mixed_bfloat16": ({}, {"precision": "mixed_bfloat16"}, (0, 0)),
    "--precision=mixed_bfloat16, Keras' unfused BatchNormalization": (
        {}, {"precision": "mixed_bfloat16", "fused": False}, (0, 0)),
    "--jit_compile (XLA)": ({}, {"jit_compile": True}, (0, 0)),
    "Keras' unfused BatchNormalization": ({}, {"fused": False}, (0, 0)),
    "TF_ENABLE_ONEDNN_OPTS=0": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, {}, (0, 0)),
    "ONEDNN_DEFAULT_FPMATH_MODE=BF16 (float32 math in bf16)": (
        {"ONEDNN_DEFAULT_FPMATH_MODE": "BF16"}, {}, (0, 0)),
    "--intra_op_threads=1": ({}, {}, (1, 0)),
    "--inter_op_threads=1": ({}, {}, (0, 1)),
    "--intra_op_threads=1 --inter_op_threads=2": ({}, {}, (1, 2)),
}
DEFAULT = next(iter(OPTIONS))


def time_option(name):
    import tensorflow as tf

    _, cohort_options, (intra, inter) = OPTIONS[name]
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    cohort = timing.make_cohort(2, "resnet32", "dml", "simultaneous", **cohort_options)
    seconds = timing.seconds_per_step(cohort, timing.in_memory_batches(FLAGS.batch_size),
                                      FLAGS.steps, warmup=FLAGS.warmup)
    return FLAGS.batch_size / seconds


def main(argv):
    del argv
    if FLAGS.worker:
        print(json.dumps({"images_per_s": time_option(FLAGS.worker)}))
        return
    names = [name for name in OPTIONS if name == DEFAULT or not FLAGS.only
             or any(name.startswith(prefix) for prefix in FLAGS.only)]
    args = [f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}", f"--batch_size={FLAGS.batch_size}"]
    rates = timing.alternate(
        lambda name: timing.run_worker(__file__, [f"--worker={name}", *args], OPTIONS[name][0])[
            "images_per_s"], names, FLAGS.rounds,
        log=lambda i, last: print(f"round {i + 1}: " + ", ".join(
            f"{n.split(' ')[0]} {r:.0f}" for n, r in last.items()), file=sys.stderr))
    base = timing.median(rates[DEFAULT])
    print(f"\nDML pair of ResNet-32, batch {FLAGS.batch_size}, simultaneous, SGD Nesterov, "
          f"{timing.machine()}; median of {FLAGS.rounds} alternating processes x {FLAGS.steps} "
          "steps")
    print("| option | images/s | vs default | all rounds |\n|---|---|---|---|")
    for name, values in rates.items():
        rounds = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {name} | {timing.median(values):.0f} | {timing.median(values) / base:.2f}x | "
              f"{rounds} |")


if __name__ == "__main__":
    app.run(main)
