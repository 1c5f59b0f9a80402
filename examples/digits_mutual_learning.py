"""Deep Mutual Learning in plain Keras code: a CNN and an MLP learn scikit-learn's digits together.

    .venv/bin/python examples/digits_mutual_learning.py --out_dir=/tmp/digits_dml

Two different Keras models, a tf.data pipeline, validation, TensorBoard and BackupAndRestore
(interrupt it and run the same command again: it resumes), then SavedModels of each peer and
of the ensemble, reloaded and checked against the fitted model.
"""

import argparse
import os

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import dml_tf
from dml_tf import export


def cnn(num_classes):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Rescaling(1 / 16)(inputs)  # digits' pixels are 0..16
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)  # what export serves as features
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name="cnn")


def mlp(num_classes):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 16)(inputs))
    x = keras.layers.Dense(64, activation="relu", name="features")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name="mlp")


def datasets(batch_size, train_size, seed, repeat=False):
    """(train, validation) tf.data pipelines of uint8 [8, 8, 1] images and int labels."""
    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]
    order = np.random.default_rng(seed).permutation(len(images))
    train, val = order[:1500][:train_size], order[1500:]
    train_ds = (tf.data.Dataset.from_tensor_slices((images[train], digits.target[train]))
                .shuffle(len(train), seed=seed).batch(batch_size))
    # With a step cap, epochs draw from one endless stream instead of running dry.
    train_ds = (train_ds.repeat() if repeat else train_ds).prefetch(tf.data.AUTOTUNE)
    val_ds = tf.data.Dataset.from_tensor_slices((images[val], digits.target[val])).batch(256)
    return train_ds, val_ds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default="runs/digits_dml")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps_per_epoch", type=int, default=None, help="cap, for quick runs")
    parser.add_argument("--train_size", type=int, default=1500, help="training images (≤ 1500)")
    parser.add_argument("--method", default="dml", help="any of dml_tf.methods.NAMES")
    parser.add_argument("--update", default="sequential", help="sequential or simultaneous")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    train_ds, val_ds = datasets(args.batch_size, args.train_size, args.seed,
                                repeat=args.steps_per_epoch is not None)
    model = dml_tf.MutualLearning([cnn(10), mlp(10)], method=args.method, update=args.update,
                                  weight_decay=1e-4)
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    history = model.fit(train_ds, validation_data=val_ds, epochs=args.epochs, shuffle=False,
                        steps_per_epoch=args.steps_per_epoch, verbose=2, callbacks=[
                            keras.callbacks.TensorBoard(os.path.join(args.out_dir, "tensorboard")),
                            keras.callbacks.BackupAndRestore(os.path.join(args.out_dir, "backup"))])
    final = {name: values[-1] for name, values in history.history.items() if name.endswith("/top1")}
    print("validation top-1 accuracy: " + ", ".join(
        f"{name[4:]} {value:.4f}" for name, value in sorted(final.items()) if name.startswith("val_")))

    paths = export.export_cohort(model.cohort, os.path.join(args.out_dir, "export"))
    images = np.concatenate([x for x, _ in val_ds.take(1).as_numpy_iterator()])
    served = tf.saved_model.load(paths["ensemble"]).signatures["serving_default"](
        images=tf.constant(images))["probabilities"]
    gap = float(np.abs(served.numpy() - model.predict(images, verbose=0)).max())
    if gap > 1e-4:
        raise SystemExit(f"the exported ensemble differs from the fitted model by {gap:.2g}")
    print(f"SavedModels in {os.path.join(args.out_dir, 'export')}: {', '.join(sorted(paths))} "
          f"(ensemble reloaded, max difference {gap:.1g})")


if __name__ == "__main__":
    main()
