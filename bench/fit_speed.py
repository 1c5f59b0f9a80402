"""`MutualLearning.fit` against the raw `Cohort.train_step` on the same cohort.

A pair of ResNet-32s (10 classes, CIFAR shapes), batch 64, SGD Nesterov, weight decay 5e-4,
one random uint8-valued batch held in memory (a tensor for the raw step, the same tensor
repeated by tf.data for fit). The two are timed in alternating rounds (the order reversed
every other round, so a shared machine's drifts hit both) and a markdown table of the
medians is printed:

  .venv/bin/python bench/fit_speed.py [--rounds=5] [--steps=20] [--updates=sequential,simultaneous]
"""

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


def timers(model, images, labels, steps):
    """{name: () -> seconds per step} for the raw step and fit, both warmed up (traced)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()

    def raw():
        return timing.seconds_per_step(model.cohort, iter(lambda: (images, labels), None), steps,
                                       warmup=0)

    def fit():
        start = time.perf_counter()
        # One fit call per round: its per-call set-up (iterator, callbacks) is counted too.
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
        return (time.perf_counter() - start) / steps

    raw(), model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)  # traces
    return {"Cohort.train_step": raw, "MutualLearning.fit": fit}


def main(argv):
    del argv
    images, labels = batch(FLAGS.batch_size)
    print(f"# fit vs raw step: ResNet-32 pair, batch {FLAGS.batch_size}, {FLAGS.steps} steps x "
          f"{FLAGS.rounds} rounds; {timing.machine()}\n")
    print("| update | Cohort.train_step img/s | MutualLearning.fit img/s | fit / raw |")
    print("|---|---|---|---|")
    for update in FLAGS.updates:
        model = make_model(update)
        measures = timers(model, images, labels, FLAGS.steps)
        values = timing.alternate(lambda name: measures[name](), list(measures), FLAGS.rounds)
        raw, fit = (FLAGS.batch_size / timing.median(values[name]) for name in measures)
        print(f"| {update} | {raw:.1f} | {fit:.1f} | {fit / raw:.3f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
