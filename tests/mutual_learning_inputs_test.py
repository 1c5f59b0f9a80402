"""Nothing silently wrong on the library path: each input that used to train or evaluate
wrongly without a word (or end in a raw traceback) is injected here, and the new behaviour
asserted (a right result, or one sentence)."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import dml_tf
from dml_tf import config as config_lib
from dml_tf import train_lib
from dml_tf.errors import UserError

SHAPE = (8, 8, 3)
NUM_CLASSES = 10


def _peer(seed, name="image"):
    inputs = keras.Input(SHAPE, name=name)
    h = keras.layers.Conv2D(4, 3, activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
    h = keras.layers.GlobalAveragePooling2D(name="features")(h)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *SHAPE)).astype(np.float32),
            rng.integers(0, NUM_CLASSES, n).astype(np.int64))


def _model(peers=None, **kwargs):
    model = dml_tf.MutualLearning(peers or [_peer(1), _peer(2)], **kwargs)
    return model


# --- severe: wrong results reported as success ---------------------------------------------

@pytest.mark.parametrize("as_dataset", [False, True])
def test_jit_compile_keeps_the_label_check(as_dataset):
    x, y = _data()
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
    bad = y.copy()
    bad[5] = NUM_CLASSES  # one class too many
    fit_data = (tf.data.Dataset.from_tensor_slices((x, bad)).batch(8),) if as_dataset else (x, bad)
    with pytest.raises(UserError, match=r"labels must be class indices in \[0, 10\)"):
        model.fit(*fit_data, batch_size=None if as_dataset else 8, verbose=0)
    before = [w.copy() for w in model.peers[0].get_weights()]
    far = np.full(len(y), 57)
    eval_data = (tf.data.Dataset.from_tensor_slices((x, far)).batch(8),) if as_dataset else (x, far)
    with pytest.raises(UserError, match=r"labels must be class indices in \[0, 10\)"):
        model.evaluate(*eval_data, verbose=0)
    model.fit(x, y, batch_size=8, verbose=0)  # good labels train under XLA as before
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.peers[0].get_weights()))


def test_integer_inputs_keep_the_dtype_the_peers_declare():
    """Ids above 2^24 are not float32-exact: a cast would train row 2^24 for both."""
    vocabulary = 2 ** 24 + 3

    def peer(seed):
        ids = keras.Input((1,), dtype="int64")
        h = keras.layers.Embedding(vocabulary, 1, embeddings_initializer=keras.initializers.Zeros(),
                                   name="embedding")(ids)
        h = keras.layers.Flatten(name="features")(h)
        return keras.Model(ids, keras.layers.Dense(
            2, kernel_initializer=keras.initializers.RandomNormal(seed=seed))(h))

    model = _model([peer(1), peer(2)], method="independent")
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    ids = np.array([[2 ** 24 + 1], [2 ** 24 + 2]], np.int64)
    model.fit(ids, np.array([0, 1]), batch_size=2, epochs=1, verbose=0)
    for p in model.peers:
        table = p.get_layer("embedding").embeddings
        rows = tf.gather(table, [2 ** 24, 2 ** 24 + 1, 2 ** 24 + 2]).numpy()[:, 0]
        assert rows[0] == 0.0  # never fed
        assert rows[1] != 0.0 and rows[2] != 0.0 and rows[1] != rows[2]


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_a_nan_input_image_stops_fit_or_is_skipped(on_nan):
    x, y = _data()
    x[3, 2, 2, 1] = np.nan
    model = _model(on_nan=on_nan)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    if on_nan == "stop":
        with pytest.raises(UserError, match=r"(Peer 1's loss became nan|The weights of peers? 1)"):
            model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert model.cohort.nonfinite_peers() == []  # the poisoned batch's updates were dropped


# --- minor: one sentence instead of a traceback ---------------------------------------------

def test_a_dataset_of_named_inputs_trains():
    x, y = _data()
    model = _model([_peer(1, "img"), _peer(2, "img")])
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(tf.data.Dataset.from_tensor_slices(({"img": x}, y)).batch(8), verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_class_weight_sample_weight_and_keras_saving_are_one_sentence(tmp_path):
    x, y = _data()
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(UserError, match="takes no class_weight"):
        model.fit(x, y, class_weight={0: 2.0}, verbose=0)
    with pytest.raises(UserError, match="takes no sample_weight"):
        model.fit(x, y, sample_weight=np.ones(len(y)), verbose=0)
    with pytest.raises(UserError, match=r"cannot be saved as one \.keras file.*save_weights"):
        model.save(str(tmp_path / "x.keras"))
    assert not (tmp_path / "x.keras").exists()


def test_predict_without_a_batch_axis_is_one_sentence():
    x, _ = _data()
    model = _model()
    with pytest.raises(UserError, match=r"have no batch axis .*x\[None\]") as info:
        model.predict(x[0], verbose=0)
    assert str(info.value).startswith("inputs of shape (8, 8, 3) have no batch axis")
    with pytest.raises(UserError, match=r"have no batch axis"):
        model(tf.constant(x[0]))  # a direct call: the same sentence, whatever Keras wraps it in


def _two_outputs():
    inputs = keras.Input(SHAPE)
    h = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, [keras.layers.Dense(NUM_CLASSES)(h), keras.layers.Dense(2)(h)])


def _sequence_output():
    inputs = keras.Input(SHAPE)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(keras.layers.Reshape((8, 24))(inputs)))


@pytest.mark.parametrize("make, message", [
    (_two_outputs, r"peer 2 \(peers\[1\]\) has 2 outputs"),
    (_sequence_output, r"peer 2 \(peers\[1\]\) outputs shape \(None, 8, 10\); .*\[batch, classes\]"),
])
def test_peers_of_other_outputs_are_one_sentence(make, message):
    with pytest.raises(UserError, match=message):
        _model([_peer(1), make()])


def test_peers_sharing_a_layer_are_refused():
    shared = keras.layers.Dense(NUM_CLASSES, name="shared_head")
    peers = []
    for _ in range(2):
        inputs = keras.Input(SHAPE)
        peers.append(keras.Model(inputs, shared(keras.layers.Flatten()(inputs))))
    with pytest.raises(UserError, match=r"peer 1 \(peers\[0\]\) and peer 2 \(peers\[1\]\) share "
                                        "the weight .*shared_head"):
        _model(peers)


def test_a_float16_policy_gets_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model([_peer(1), _peer(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(isinstance(o, keras.optimizers.LossScaleOptimizer) for o in model.cohort.optimizers)


def test_dml_l2_needs_one_features_width():
    flat = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                             keras.layers.Dense(NUM_CLASSES)])
    model = _model([_peer(1), flat], method="dml_l2")
    with pytest.raises(UserError, match=r"peer 2 .*has no layer named 'features'"):
        model.compile(optimizer="sgd")
    wide = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(name="features"),
                             keras.layers.Dense(NUM_CLASSES)])
    model = _model([_peer(1), wide], method="dml_l2")
    with pytest.raises(UserError, match=r"widths differ \(peer 1: 4, peer 2: 192\)"):
        model.compile(optimizer="sgd")


def test_dml_l2_of_unequal_widths_is_refused_before_the_run_folder(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(16) % 4, x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(8) % 4)
    config = dataclasses.replace(config_lib.Config(
        dataset="npz", data_dir=str(data), nets=("tiny", "resnet32"), method="dml_l2", epochs=1,
        batch_size=8, export=False, model_dir=str(tmp_path / "run")))
    with pytest.raises(UserError, match=r"widths differ \(peer 1: 16, peer 2: 64\)"):
        train_lib.train_and_evaluate(config)
    assert not (tmp_path / "run").exists()  # no stray flags.json, no lock


def test_methods_declare_whether_peers_mimic_each_other():
    from dml_tf import methods
    assert [methods.method_class(n).mutual for n in ("independent", "kd", "entropy_reg")] == [
        False] * 3
    assert all(methods.method_class(n).mutual for n in ("dml", "dml_js", "dml_e", "kdcl_general"))
