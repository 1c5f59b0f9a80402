"""What ending an epoch's tf.data iterator costs, with tf.data's autotuning model on and off.

The run scripts iterate a new dataset each epoch (a seed per epoch, so that a resumed run
draws the same data order). This trains a DML ResNet-32 pair (sequential, batch 64) on the
real CIFAR-10 subset with the training pipeline, epoch after epoch, and times each epoch's
steps and then the deletion of its iterator; `train_lib.without_autotune` is the fix this
measured.

  .venv/bin/python bench/epoch_teardown.py --npz=PATH [--autotune=false] [--epochs=6]
"""

import gc
import time

import numpy as np
import timing
from absl import app, flags

flags.DEFINE_string("npz", None, "The CIFAR-10 subset .npz (x_train, y_train, ...).")
flags.DEFINE_bool("autotune", True, "tf.data's autotuning model on (its default) or off.")
flags.DEFINE_integer("epochs", 6, "Epochs to time.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from dml_tf import tasks, train_lib
    from dml_tf.data import pipeline

    with np.load(FLAGS.npz) as f:
        images, labels = f["x_train"], f["y_train"].astype(np.int64)
    cohort = timing.make_cohort(2, "resnet32", "dml", "sequential", num_classes=10)
    steps = len(images) // 64
    print(f"autotune {'on' if FLAGS.autotune else 'off'}; {timing.machine()}")
    for epoch in range(FLAGS.epochs):
        dataset = pipeline.train_dataset(images, labels, [125.0] * 3, [63.0] * 3, 64, seed=epoch)
        if not FLAGS.autotune:
            dataset = train_lib.without_autotune(dataset)
        batches = tasks.diagnosed(object(), dataset)  # as train_lib iterates an epoch
        start = time.perf_counter()
        for _ in range(steps):
            out = cohort.train_step(*next(batches))
        float(out["peer1/loss"])
        trained = time.perf_counter()
        del batches  # the iterator goes with the generator, as when an epoch's loop returns
        deleted = time.perf_counter()
        gc.collect()
        collected = time.perf_counter()
        print(f"epoch {epoch + 1}: {steps} steps {trained - start:.1f} s; deleting the iterator "
              f"{deleted - trained:.2f} s; gc {collected - deleted:.2f} s", flush=True)


if __name__ == "__main__":
    app.run(main)
