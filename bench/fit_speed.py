"""`MutualLearning.fit` against the raw `Cohort.train_step` on the same cohort.

A pair of ResNet-32s (10 classes, CIFAR shapes), batch 64, SGD Nesterov, weight decay 5e-4,
one random uint8-valued batch held in memory (a tensor for the raw step, the same tensor
repeated by tf.data for fit). The two are timed in alternating rounds (the order reversed
every other round, so a shared machine's drifts hit both) and a markdown table of the
medians is printed, fit both as whole calls (set-up and tear-down included) and as its
steps alone (a Keras callback's clock), and the ratio of this process's CPU seconds per step
(fit's over the raw step's: the work done, less sensitive than wall time to other jobs on a
shared machine):

  .venv/bin/python bench/fit_speed.py [--rounds=5] [--steps=20] [--updates=sequential,simultaneous]
"""

import sys
import time

import timing
from absl import app, flags

flags.DEFINE_integer("rounds", 5, "Alternating timing rounds (median reported).")
flags.DEFINE_integer("steps", 20, "Timed steps per round and variant.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_list("updates", ["sequential", "simultaneous"], "Update orders to measure.")
FLAGS = flags.FLAGS


def make_model(update):
    import keras

    import dml_tf
    from dml_tf import nets

    keras.utils.set_random_seed(0)
    peers = [nets.build("resnet32", 10, (32, 32, 3), name=f"peer{k}") for k in (1, 2)]
    model = dml_tf.MutualLearning(peers, "dml", update, weight_decay=5e-4)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True))
    return model


def batch(batch_size):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (batch_size, 32, 32, 3)) / 255.0, tf.float32)
    return images, tf.constant(rng.integers(0, 10, batch_size), tf.int64)


def timers(model, images, labels, steps, cpu_seconds):
    """{name: () -> wall seconds per step} for the raw step and fit, both warmed up (traced);
    each call also appends this process's CPU seconds per step to cpu_seconds[raw|fit]."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()

    def raw():
        start = time.process_time()
        wall = timing.seconds_per_step(model.cohort, iter(lambda: (images, labels), None), steps,
                                       warmup=0)
        cpu_seconds.setdefault("raw", []).append((time.process_time() - start) / steps)
        return wall

    steady = StepClock()

    def fit():
        start, cpu_start = time.perf_counter(), time.process_time()
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[steady])
        cpu_seconds.setdefault("fit", []).append((time.process_time() - cpu_start) / steps)
        return (time.perf_counter() - start) / steps

    def fit_steps():
        return steady.seconds_per_step()  # of the fit call just timed

    raw(), model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)  # traces
    cpu_seconds.clear()
    return {"Cohort.train_step": raw, "MutualLearning.fit": fit, "fit_steps": fit_steps}


class StepClock:
    """A Keras callback timing fit's steps after the first one, without fit's per-call set-up
    and tear-down (iterator, callbacks), which a long epoch amortises."""

    def __new__(cls):
        import keras

        class Clock(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.ends = []

            def on_train_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())

            def seconds_per_step(self):
                return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)

        return Clock()


def main(argv):
    del argv
    images, labels = batch(FLAGS.batch_size)
    print(f"# fit vs raw step: ResNet-32 pair, batch {FLAGS.batch_size}, {FLAGS.steps} steps x "
          f"{FLAGS.rounds} rounds; {timing.machine()}\n")
    print("| update | Cohort.train_step img/s | fit img/s (whole call) | fit img/s (steps) "
          "| fit / raw (whole call) | fit / raw (steps) | fit / raw CPU s per step |")
    print("|---|---|---|---|---|---|---|")
    for update in FLAGS.updates:
        model = make_model(update)
        cpu = {}
        measures = timers(model, images, labels, FLAGS.steps, cpu)
        timed = ["Cohort.train_step", "MutualLearning.fit"]
        # fit_steps reads the clock of the fit call just made: measured right after it.
        values = timing.alternate(
            lambda name: [measures[name]()] + ([measures["fit_steps"]()] if name != timed[0] else []),
            timed, FLAGS.rounds)
        raw = [FLAGS.batch_size / v[0] for v in values[timed[0]]]
        whole = [FLAGS.batch_size / v[0] for v in values[timed[1]]]
        steps = [FLAGS.batch_size / v[1] for v in values[timed[1]]]
        print("  rounds (img/s): raw " + " ".join(f"{v:.1f}" for v in raw) + "; fit " +
              " ".join(f"{v:.1f}" for v in whole) + "; fit steps " +
              " ".join(f"{v:.1f}" for v in steps), file=sys.stderr, flush=True)
        raw, whole, steps = (timing.median(v) for v in (raw, whole, steps))
        cpu_ratio = timing.median(cpu["fit"]) / timing.median(cpu["raw"])
        print(f"| {update} | {raw:.1f} | {whole:.1f} | {steps:.1f} | {whole / raw:.3f} "
              f"| {steps / raw:.3f} | {cpu_ratio:.3f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
