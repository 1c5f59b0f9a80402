"""dml_tf.MutualLearning: Keras compile/fit/evaluate against the cohort's own steps and numpy."""

import csv
import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import dml_tf
from dml_tf import export, methods, nets
from dml_tf.cohort import Cohort
from dml_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 3
SHAPE = (8, 8, 3)
BATCH = 8


def _conv_peer(seed):
    inputs = keras.Input(SHAPE)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
    h = keras.layers.GlobalAveragePooling2D(name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(
        NUM_CLASSES, kernel_initializer=keras.initializers.GlorotUniform(seed + 100))(h))


def _sequential_peer(seed):
    return keras.Sequential([
        keras.Input(SHAPE), keras.layers.Flatten(),
        keras.layers.Dense(6, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(seed)),
        keras.layers.Dense(NUM_CLASSES, kernel_initializer=keras.initializers.GlorotUniform(seed + 1))])


class _SubclassedPeer(keras.Model):
    def __init__(self, seed):
        super().__init__(name="subclassed")
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(NUM_CLASSES, kernel_initializer=keras.initializers.GlorotUniform(seed))

    def call(self, x):
        return self.dense(self.flatten(x) / 100.0)


def _subclassed_peer(seed):
    peer = _SubclassedPeer(seed)
    peer(np.zeros((1, *SHAPE), np.float32))  # built by a call: no keras.Input to read a shape from
    return peer


def _tiny_peer(seed):
    keras.utils.set_random_seed(seed)
    return nets.build("tiny", NUM_CLASSES, SHAPE, name=f"tiny{seed}")


COHORTS = {
    "pair": lambda: [_tiny_peer(1), _conv_peer(2)],
    "three_kinds": lambda: [_conv_peer(3), _sequential_peer(4), _subclassed_peer(5)],
}


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *SHAPE)).astype(np.uint8)
    return images, rng.integers(0, NUM_CLASSES, n).astype(np.int64)


def _weights(models):
    return [v.numpy() for m in models for v in m.weights]


def _assert_same_weights(got, want, atol=1e-6, rtol=1e-5):
    # Relative as well as absolute: BatchNorm moving variances reach ~7,000 here, where one float32
    # rounding step (which differs between CPUs' kernels) is ~1e-3 in absolute terms.
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=atol, rtol=rtol)


def _sgd():
    return keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.05, 2, 0.5),
                                momentum=0.9)


@pytest.mark.parametrize("cohort", sorted(COHORTS))
@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_fit_is_the_cohorts_train_steps_and_logs_their_running_means(update, cohort):
    images, labels = _data()
    model = dml_tf.MutualLearning(COHORTS[cohort](), "dml", update, weight_decay=1e-3)
    model.compile(optimizer=_sgd())
    history = model.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    peers = COHORTS[cohort]()
    reference = Cohort(peers, [_sgd() for _ in peers], methods.get("dml"), update, weight_decay=1e-3)
    steps = [reference.train_step(tf.constant(images[i:i + BATCH], tf.float32),
                                  tf.constant(labels[i:i + BATCH]))
             for i in range(0, len(images), BATCH)]
    _assert_same_weights(_weights(model.peers), _weights(peers))
    for k in range(1, len(peers) + 1):
        for name in ("ce", "mimicry", "top1", "weight_decay"):
            want = np.mean([float(s[f"peer{k}/{name}"]) for s in steps])  # equal batches
            np.testing.assert_allclose(history.history[f"peer{k}/{name}"][0], want, rtol=1e-5)
        # The peer's whole objective, summed here from its terms (the one vocabulary).
        want = np.mean([float(s[f"peer{k}/ce"] + s[f"peer{k}/mimicry"] + s[f"peer{k}/weight_decay"])
                        for s in steps])
        np.testing.assert_allclose(history.history[f"peer{k}/loss"][0], want, rtol=1e-5)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_evaluate_predict_and_peer_logits_match_numpy():
    images, labels = _data(24, seed=3)
    model = dml_tf.MutualLearning([_conv_peer(1), _sequential_peer(2)], "independent")
    model.compile(optimizer="sgd")
    logits = [p(images.astype(np.float32)).numpy().astype(np.float64) for p in model.peers]
    probs = [_softmax(z) for z in logits]
    ensemble = (probs[0] + probs[1]) / 2
    rows = np.arange(len(labels))
    got = model.evaluate(images, labels, batch_size=BATCH, return_dict=True, verbose=0)
    for k, p in enumerate(probs, start=1):
        np.testing.assert_allclose(got[f"peer{k}/ce"], -np.log(p[rows, labels]).mean(), rtol=1e-5)
        np.testing.assert_allclose(got[f"peer{k}/top1"], (p.argmax(-1) == labels).mean())
        assert f"peer{k}/mimicry" not in got  # independent learning has no mimicry term
    np.testing.assert_allclose(got["ensemble/ce"], -np.log(ensemble[rows, labels]).mean(), rtol=1e-5)
    np.testing.assert_allclose(got["ensemble/top1"], (ensemble.argmax(-1) == labels).mean())
    np.testing.assert_allclose(model.predict(images, verbose=0), ensemble, atol=1e-6)
    for z, want in zip(model.peer_logits(images), logits):
        np.testing.assert_allclose(z.numpy(), want, atol=1e-5)


@pytest.mark.parametrize("dtype, column", [(np.int32, False), (np.uint8, True), (np.int64, True)])
def test_integer_labels_of_shape_b_or_b1_train_as_int64_labels(dtype, column):
    images, labels = _data(16)
    runs = []
    for y in (labels, labels.astype(dtype)[:, None] if column else labels.astype(dtype)):
        model = dml_tf.MutualLearning([_conv_peer(1), _conv_peer(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        model.fit(images, y, batch_size=BATCH, shuffle=False, verbose=0)
        runs.append(_weights(model.peers))
    _assert_same_weights(runs[1], runs[0], atol=0, rtol=0)


def test_tf_data_dataset_with_validation_logs_every_peer_and_the_ensemble():
    images, labels = _data()
    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(BATCH)
    model = dml_tf.MutualLearning([_tiny_peer(1), _tiny_peer(2)], "dml_js")
    model.compile(optimizer=[keras.optimizers.SGD(0.1), keras.optimizers.Adam(1e-3)])
    history = model.fit(train, validation_data=train.take(2), epochs=1, verbose=0)
    assert {"val_ensemble/top1", "val_ensemble/ce", "val_peer2/mimicry", "peer1/mimicry",
            "peer2/top1", "loss", "val_loss"} <= set(history.history)
    assert "ensemble/top1" not in history.history  # training logs the peers only
    assert int(model.cohort.optimizers[1].iterations.numpy()) == len(images) // BATCH
    assert isinstance(model.cohort.optimizers[1], keras.optimizers.Adam)


def test_one_optimizer_is_copied_so_each_peer_has_its_own_slots():
    model = dml_tf.MutualLearning([_conv_peer(1), _conv_peer(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    first, second = model.cohort.optimizers
    assert first is not second and first is model.optimizer
    assert second.get_config()["momentum"] == 0.9
    slots = [{id(v) for v in o.variables} for o in (first, second)]
    assert not slots[0] & slots[1]
    with pytest.raises(UserError, match="optimizer"):
        model.compile(optimizer=[first])


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_an_interrupted_fit_where_it_stopped(tmp_path):
    images, labels = _data()

    def fresh(seed):
        model = dml_tf.MutualLearning([_conv_peer(seed), _sequential_peer(seed + 1)])
        model.compile(optimizer=_sgd())
        return model

    uninterrupted = fresh(1)
    uninterrupted.fit(images, labels, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    interrupted = fresh(1)
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(images, labels, batch_size=BATCH, epochs=3, shuffle=False, verbose=0,
                        callbacks=[backup, _Interrupt(epoch=1, batch=2)])
    # A new process's model: other initial weights, fresh optimizer slots, restored from backup.
    resumed = fresh(7)
    history = resumed.fit(images, labels, batch_size=BATCH, epochs=3, shuffle=False, verbose=0,
                          callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert history.epoch == [1, 2]
    _assert_same_weights(_weights(resumed.peers), _weights(uninterrupted.peers))
    _assert_same_weights([v.numpy() for o in resumed.cohort.optimizers for v in o.variables],
                         [v.numpy() for o in uninterrupted.cohort.optimizers for v in o.variables])


def _scalar_tags(logdir):
    tags = set()
    for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_tensorboard_checkpoint_csv_and_early_stopping(tmp_path):
    images, labels = _data()
    model = dml_tf.MutualLearning([_conv_peer(1), _sequential_peer(2)])
    # lr 0: the validation metrics never improve, so early stopping must end the run.
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    callbacks = [
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt" / "e{epoch}.weights.h5"),
                                        save_weights_only=True),
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.EarlyStopping(monitor="val_ensemble/top1", mode="max", patience=1),
    ]
    history = model.fit(images, labels, batch_size=BATCH, epochs=20, verbose=0,
                        validation_data=(images[:16], labels[:16]), callbacks=callbacks)
    assert history.epoch == [0, 1]
    tags = _scalar_tags(str(tmp_path / "tb"))
    assert {"epoch_peer1/ce", "epoch_peer2/mimicry", "epoch_peer2/top1",
            "epoch_ensemble/top1"} <= tags  # validation curves live in their own folder
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_ensemble/top1"]) for r in rows] == pytest.approx(
        history.history["val_ensemble/top1"])
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["e1.weights.h5", "e2.weights.h5"]
    restored = dml_tf.MutualLearning([_conv_peer(5), _sequential_peer(6)])
    restored.compile(optimizer=keras.optimizers.SGD(0.0))
    restored.load_weights(str(tmp_path / "ckpt" / "e2.weights.h5"))
    _assert_same_weights(_weights(restored.peers), _weights(model.peers), atol=0, rtol=0)


def test_save_and_load_weights_round_trip_with_optimizer_state(tmp_path):
    images, labels = _data(16)
    model = dml_tf.MutualLearning([_tiny_peer(1), _tiny_peer(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.fit(images, labels, batch_size=BATCH, verbose=0)
    model.save_weights(str(tmp_path / "m.weights.h5"))
    other = dml_tf.MutualLearning([_tiny_peer(3), _tiny_peer(4)])
    other.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    other.load_weights(str(tmp_path / "m.weights.h5"))
    np.testing.assert_allclose(other.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    _assert_same_weights([v.numpy() for o in other.cohort.optimizers for v in o.variables],
                         [v.numpy() for o in model.cohort.optimizers for v in o.variables], atol=0)


def test_exported_ensemble_serves_the_fitted_models_probabilities(tmp_path):
    images, labels = _data(16)
    model = dml_tf.MutualLearning([_tiny_peer(1), _conv_peer(2)], update="simultaneous")
    model.compile(optimizer="adam")
    model.fit(images, labels, batch_size=BATCH, verbose=0)
    paths = export.export_cohort(model.cohort, str(tmp_path / "export"))
    served = tf.saved_model.load(paths["ensemble"]).signatures["serving_default"](
        images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(), model.predict(images, verbose=0),
                               atol=1e-5)


def _softmax_dense_peer():
    return keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                             keras.layers.Dense(NUM_CLASSES, activation="softmax")])


def _softmax_layer_peer():
    inputs = keras.Input(SHAPE)
    return keras.Model(inputs, keras.layers.Softmax()(keras.layers.Dense(NUM_CLASSES)(
        keras.layers.Flatten()(inputs))))


@pytest.mark.parametrize("peers, kwargs, message", [
    (lambda: [_conv_peer(1), _softmax_dense_peer()], {}, r"peer 2 \(peers\[1\]\) ends in a softmax.*remove.*classifier_activation=None"),
    (lambda: [_softmax_layer_peer(), _conv_peer(1)], {}, r"peer 1 \(peers\[0\]\) ends in a softmax"),
    (lambda: [_conv_peer(1), keras.Sequential([keras.layers.Dense(NUM_CLASSES)])], {},
     r"peer 2 \(peers\[1\]\) has no input shape; start it with keras.Input"),
    (lambda: [_conv_peer(1)], {}, r"method='dml' needs at least 2 peers.*peers"),
    (lambda: [_conv_peer(1), _conv_peer(2)], {"update": "sideways"}, r"update='sideways'"),
    (lambda: [_conv_peer(1), _conv_peer(2)], {"method": "dlm"}, r"method='dlm' is not a method"),
    (lambda: _conv_peer(1), {}, r"peers must be a non-empty list"),
])
def test_bad_arguments_are_one_sentence_user_errors(peers, kwargs, message):
    with pytest.raises(UserError, match=message) as info:
        dml_tf.MutualLearning(peers(), **kwargs)
    assert "--" not in str(info.value)  # Python arguments, never flags


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 2, 3] * 4), r"labels must be class indices in \[0, 3\)"),
    (np.array([0, 1, -1, 2] * 4, np.int32), r"labels must be class indices in \[0, 3\)"),
    (np.eye(NUM_CLASSES, dtype=np.float32)[[0, 1, 2, 0] * 4], "look one-hot"),
    (np.array([0.0, 1.0, 2.0, 1.0] * 4, np.float32), "integer class indices"),
])
def test_bad_labels_are_one_sentence_user_errors(labels, message):
    images, _ = _data(16)
    model = dml_tf.MutualLearning([_conv_peer(1), _conv_peer(2)])
    model.compile(optimizer="sgd")
    with pytest.raises(UserError, match=message):
        model.fit(images, labels, batch_size=BATCH, verbose=0)
    if "indices in" in message:
        with pytest.raises(UserError, match=message):
            model.evaluate(images, labels, batch_size=BATCH, verbose=0)


def test_cohort_before_compile_says_to_compile():
    model = dml_tf.MutualLearning([_conv_peer(1), _conv_peer(2)])
    with pytest.raises(UserError, match=r"compile\(optimizer=...\)"):
        model.cohort  # noqa: B018


_MIRRORED = """
import json, sys
import numpy as np
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
sys.path.insert(0, sys.argv[1])
import dml_tf

def peer(seed):
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(seed + 9))(h))

rng = np.random.default_rng(0)
x, y = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)
out = {}
for update in ("sequential", "simultaneous"):
    weights = []
    for strategy in (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), None):
        with strategy.scope() if strategy else tf.distribute.get_strategy().scope():
            model = dml_tf.MutualLearning([peer(1), peer(2)], update=update, weight_decay=1e-3)
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                            validation_data=(x, y))
        weights.append([v.numpy() for p in model.peers for v in p.weights])
        if strategy:
            replicas = model.cohort.strategy.num_replicas_in_sync
            distributed = model.cohort.distributed
            keys = sorted(history.history)
    gap = max(float(np.abs(a - b).max()) for a, b in zip(*weights))
    out[update] = {"gap": gap, "replicas": replicas, "distributed": distributed, "keys": keys}
print(json.dumps(out))
"""


def test_fit_under_mirrored_strategy_on_two_devices_matches_one_device():
    proc = subprocess.run([sys.executable, "-c", _MIRRORED, ROOT], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for update in ("sequential", "simultaneous"):
        assert out[update]["replicas"] == 2 and out[update]["distributed"]
        assert out[update]["gap"] < 1e-5
        assert "val_ensemble/top1" in out[update]["keys"]


def test_the_digits_example_trains_validates_logs_backs_up_and_exports(tmp_path):
    script = os.path.join(ROOT, "examples", "digits_mutual_learning.py")
    proc = subprocess.run(
        [sys.executable, script, f"--out_dir={tmp_path}", "--epochs=2", "--steps_per_epoch=2",
         "--train_size=64", "--batch_size=16", "--update=simultaneous"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ensemble reloaded" in proc.stdout and "val_ensemble/top1" in proc.stdout
    assert {"peer1", "peer2", "ensemble"} <= set(os.listdir(tmp_path / "export"))
    assert {"epoch_peer2/ce", "epoch_ensemble/top1"} <= _scalar_tags(str(tmp_path / "tensorboard"))
    assert not os.path.exists(tmp_path / "backup")  # BackupAndRestore cleans up after a whole run
