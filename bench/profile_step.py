"""Where a cohort step's time goes: tf.profiler over a few steps, self time per op type.

Profiles `timing.make_cohort`'s cohort (2 ResNet-32 peers, batch 64, as bench/vs_pytorch.py
times it; `--net` profiles a pair of another network) and prints, per op type, the self time
per step summed over threads (so on 2 cores the column adds up to about twice the wall
time), its share, and the op count.
The trace itself is left in --logdir for TensorBoard's profile plugin.

xprof converts the trace (bench-only, in bench/requirements.txt):

  .venv/bin/python bench/profile_step.py [--precision=mixed_bfloat16] [--update=sequential]
      [--tf_options=jit_compile=true] [--intra_op_threads=1 --inter_op_threads=2]
"""

import collections
import glob
import json
import os
import time

import timing
from absl import app, flags

flags.DEFINE_string("net", "resnet32", "The network of both peers (a dml_tf.nets name).")
flags.DEFINE_string("precision", "float32", "float32 or mixed_bfloat16.")
flags.DEFINE_string("update", "simultaneous", "simultaneous or sequential.")
flags.DEFINE_integer("steps", 10, "Profiled steps, after 10 untimed ones.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_list("tf_options", [], "Extra cohort options, name=value.")
flags.DEFINE_integer("intra_op_threads", 0, "tf.config intra-op threads (0: TensorFlow's).")
flags.DEFINE_integer("inter_op_threads", 0, "tf.config inter-op threads (0: TensorFlow's).")
flags.DEFINE_integer("top", 25, "Op types to print.")
flags.DEFINE_string("logdir", "/tmp/dml_tf_profile", "Where the trace goes.")
FLAGS = flags.FLAGS


def op_table(xplane_path):
    """{op type: (self microseconds, occurrences)} from xprof's framework_op_stats."""
    from xprof.convert import raw_to_tool_data

    data, _ = raw_to_tool_data.xspace_to_tool_data([xplane_path], "framework_op_stats", {})
    table = json.loads(data)[0]  # [0]: the whole profile, incl. idle; the rows are ops
    columns = [c["id"] for c in table["cols"]]
    totals = collections.defaultdict(lambda: [0.0, 0])
    for row in table["rows"]:
        cell = dict(zip(columns, (c["v"] if c else None for c in row["c"])))
        if cell.get("host_or_device") not in (None, "Host"):
            continue
        totals[cell["type"]][0] += cell["total_self_time"]
        totals[cell["type"]][1] += cell["occurrences"]
    return totals


def main(argv):
    del argv
    import tensorflow as tf

    timing.set_threads(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    cohort = timing.make_cohort(2, FLAGS.net, "dml", FLAGS.update, precision=FLAGS.precision,
                                **timing.parse_options(FLAGS.tf_options))
    batches = timing.in_memory_batches(FLAGS.batch_size)
    seconds = timing.seconds_per_step(cohort, batches, 20, warmup=10)
    logdir = os.path.join(FLAGS.logdir, time.strftime("%Y%m%d-%H%M%S"))
    tf.profiler.experimental.start(logdir)
    for _ in range(FLAGS.steps):
        out = cohort.train_step(*next(batches))
    float(out["peer1/loss"])
    tf.profiler.experimental.stop()
    totals = op_table(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0])
    all_ms = sum(t for t, _ in totals.values()) / 1e3 / FLAGS.steps
    intra, inter = FLAGS.intra_op_threads or "default", FLAGS.inter_op_threads or "default"
    threads = f"intra {intra} / inter {inter}"
    print(f"2 x {FLAGS.net}, batch {FLAGS.batch_size}, {FLAGS.precision}, {FLAGS.update}, "
          f"options {FLAGS.tf_options}, threads {threads}; unprofiled: {seconds * 1e3:.0f} ms/step "
          f"= {FLAGS.batch_size / seconds:.0f} img/s; trace in {logdir}\n")
    print("| op type | self ms per step (all threads) | share | ops per step |\n|---|---|---|---|")
    for op_type, (micros, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:FLAGS.top]:
        ms = micros / 1e3 / FLAGS.steps
        print(f"| {op_type} | {ms:.1f} | {ms / all_ms:.1%} | {count / FLAGS.steps:.0f} |")
    print(f"| all | {all_ms:.1f} | | |")


if __name__ == "__main__":
    app.run(main)
