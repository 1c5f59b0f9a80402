"""keras.applications peers trained from scratch on small images: BatchNorm momentum.

Trains `keras.applications` networks with `weights=None` on the offline digits (scikit-learn's
real 8x8 digits upsampled to 32x32, 1,437 train / 360 test, `dml_tf.data.digits`), once with
the application's own BatchNormalization momentum and once with 0.9, both in plain
`keras.Model.fit` (one network) and in `dml_tf.MutualLearning.fit` (a DML pair). For each it
prints the training accuracy that fit reports (BatchNorm in training mode: batch statistics)
beside `evaluate` on the training and test images (inference mode: the moving statistics).
A moving average that lags behind the weights shows as a training accuracy far above an
evaluated one near chance (10 %). It also prints the two refusals a user meets first (a
softmax classifier, an input below the application's minimum size). Docs:
docs/keras_applications.md.

  .venv/bin/python bench/keras_applications_small_images.py \
      [--apps=mobilenet_v2,resnet50,efficientnet_b0] [--momenta=default,0.9] \
      [--fits=plain,mutual] [--epochs=3]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml_tf import quiet_start  # noqa: E402

quiet_start.quiet()  # TensorFlow's start-up lines would open the bench's output

from absl import app, flags  # noqa: E402

# Each entry: the application, and the preprocessing it expects (inside the model, so that the
# peers take the dataset's 0..255 pixels and an export serves raw images).
APPS = {
    "mobilenet_v2": ("MobileNetV2", "mobilenet_v2"),
    "resnet50": ("ResNet50", "resnet50"),
    "efficientnet_b0": ("EfficientNetB0", None),  # rescales and normalises inside the model
}

flags.DEFINE_list("apps", ["mobilenet_v2"], f"Applications to train: {', '.join(APPS)}.")
flags.DEFINE_list("momenta", ["default", "0.9"],
                  "BatchNormalization momenta to compare ('default': the application's own).")
flags.DEFINE_list("fits", ["plain", "mutual"],
                  "plain: one network in keras.Model.fit; mutual: a pair in MutualLearning.fit.")
flags.DEFINE_integer("epochs", 3, "Training epochs of every run.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam's learning rate.")
flags.DEFINE_integer("seed", 0, "Seed of the first network (the second peer's is seed + 1).")
FLAGS = flags.FLAGS


def batchnorm_momenta(model):
    """The distinct momenta of the model's BatchNormalization layers, sorted."""
    import keras

    return sorted({layer.momentum for layer in _layers(model)
                   if isinstance(layer, keras.layers.BatchNormalization)})


def set_batchnorm_momentum(model, momentum):
    """Sets every BatchNormalization layer's momentum; done before compile, fit traces it."""
    import keras

    for layer in _layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):  # a nested model
            yield from _layers(layer)


def build(app_name, momentum, seed, num_classes=10, image_size=32):
    """An application from scratch, uint8-valued float images in, logits out."""
    import keras

    constructor, preprocess_module = APPS[app_name]
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    if preprocess_module:
        x = getattr(keras.applications, preprocess_module).preprocess_input(x)
    base = getattr(keras.applications, constructor)(
        weights=None, input_shape=(image_size, image_size, 3), classes=num_classes,
        classifier_activation=None)  # dml_tf needs logits
    if momentum != "default":
        set_batchnorm_momentum(base, float(momentum))
    return keras.Model(inputs, base(x), name=f"{app_name}_{seed}")


def train_plain(data, app_name, momentum):
    """(fit's last training accuracy, evaluated train accuracy, evaluated test accuracy)."""
    import keras

    model = build(app_name, momentum, FLAGS.seed)
    model.compile(keras.optimizers.Adam(FLAGS.learning_rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(data.x_train, data.y_train, batch_size=FLAGS.batch_size,
                        epochs=FLAGS.epochs, verbose=0)
    train = model.evaluate(data.x_train, data.y_train, verbose=0, return_dict=True)
    test = model.evaluate(data.x_test, data.y_test, verbose=0, return_dict=True)
    return history.history["accuracy"][-1], train["accuracy"], test["accuracy"]


def train_mutual(data, app_name, momentum):
    """The same three numbers for each peer of a DML pair, as "p1 / p2" strings."""
    import keras

    import dml_tf

    peers = [build(app_name, momentum, FLAGS.seed + k) for k in (0, 1)]
    model = dml_tf.MutualLearning(peers, method="dml")
    model.compile(optimizer=keras.optimizers.Adam(FLAGS.learning_rate))
    history = model.fit(data.x_train, data.y_train, batch_size=FLAGS.batch_size,
                        epochs=FLAGS.epochs, verbose=0)
    train = model.evaluate(data.x_train, data.y_train, verbose=0, return_dict=True)
    test = model.evaluate(data.x_test, data.y_test, verbose=0, return_dict=True)
    fitted = [history.history[f"peer{k}/top1"][-1] for k in (1, 2)]
    evaluated = [[logs[f"peer{k}/top1"] for k in (1, 2)] for logs in (train, test)]
    return tuple(" / ".join(f"{100 * v:.1f}" for v in pair) for pair in [fitted, *evaluated])


def refusals():
    """The messages of the two mistakes a user makes first, as (what, message) pairs."""
    import keras

    import dml_tf
    from dml_tf.errors import UserError

    found = []
    softmax = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    try:
        dml_tf.MutualLearning([softmax, build("mobilenet_v2", "default", 1)])
    except UserError as error:
        found.append(("classifier_activation left at 'softmax'", str(error)))
    try:
        keras.applications.MobileNetV2(weights=None, input_shape=(24, 24, 3), classes=10)
    except ValueError as error:
        found.append(("MobileNetV2 on 24x24 images", str(error)))
    return found


def _check_flags():
    """Exits with one line for a value the runs below would fail on only later."""
    unknown = sorted(set(FLAGS.apps) - set(APPS))
    if unknown:
        sys.exit(f"error: --apps has {', '.join(unknown)}; choose from {', '.join(APPS)}.")
    unknown = sorted(set(FLAGS.fits) - {"plain", "mutual"})
    if unknown:
        sys.exit(f"error: --fits has {', '.join(unknown)}; choose from plain, mutual.")
    for momentum in FLAGS.momenta:
        try:
            valid = momentum == "default" or 0.0 <= float(momentum) < 1.0
        except ValueError:
            valid = False
        if not valid:
            sys.exit(f"error: --momenta has {momentum!r}; pass 'default' or numbers in [0, 1).")


def main(argv):
    del argv
    from dml_tf.data import digits

    _check_flags()
    data = digits.load()
    print(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images, 32x32, "
          f"{FLAGS.epochs} epochs, batch {FLAGS.batch_size}, Adam {FLAGS.learning_rate}, "
          f"seed {FLAGS.seed}\n")
    for what, message in refusals():
        print(f"{what}: {message}")
    print("\n| application | BN momentum | fit | training accuracy (fit) | evaluate: train | "
          "evaluate: test | seconds |")
    print("|---|---|---|---|---|---|---|")
    for app_name in FLAGS.apps:
        own = batchnorm_momenta(build(app_name, "default", FLAGS.seed))
        for momentum in FLAGS.momenta:
            shown = f"{'/'.join(map(str, own))} (default)" if momentum == "default" else momentum
            for fit in FLAGS.fits:
                start = time.perf_counter()
                if fit == "plain":
                    cells = [f"{100 * v:.1f}" for v in train_plain(data, app_name, momentum)]
                else:
                    cells = list(train_mutual(data, app_name, momentum))
                seconds = time.perf_counter() - start
                print(f"| {app_name} | {shown} | {fit} | {' | '.join(cells)} | {seconds:.0f} |",
                      flush=True)


if __name__ == "__main__":
    app.run(main)
