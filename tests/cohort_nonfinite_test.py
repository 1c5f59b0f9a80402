"""Divergence is never a success: skipped divergent updates, and finding non-finite peers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dml_tf import methods
from dml_tf.cohort import Cohort


def _model(seed, name, batch_norm=True):
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
    if batch_norm:
        h = keras.layers.BatchNormalization()(h)
    return keras.Model(inputs, keras.layers.Dense(2)(h), name=name)


def _batch():
    rng = np.random.default_rng(0)
    # Large inputs make large (finite) kernel gradients: times lr 1e38 they overflow float32.
    return (tf.constant(1e3 * rng.normal(size=(8, 3)), tf.float32),
            tf.constant(rng.integers(0, 2, 8), tf.int64))


def _state(model, optimizer):
    return ([v.numpy().copy() for v in model.trainable_variables],
            [v.numpy().copy() for v in optimizer.variables])


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_an_update_that_makes_weights_infinite_is_dropped_with_its_optimizer_state(update):
    models = [_model(1, "peer1", batch_norm=False), _model(2, "peer2", batch_norm=False)]
    # Peer 1's update overflows; peer 2 learns normally.
    optimizers = [keras.optimizers.SGD(1e38, momentum=0.9), keras.optimizers.SGD(0.1, momentum=0.9)]
    cohort = Cohort(models, optimizers, methods.get("dml"), update, skip_nonfinite=True)
    images, labels = _batch()
    before = [_state(m, o) for m, o in zip(models, optimizers)]
    out = cohort.train_step(images, labels)
    assert np.isfinite(out["peer1/loss"].numpy())  # the loss itself was finite
    weights, slots = _state(models[0], optimizers[0])
    for old, new in zip(before[0][0] + before[0][1], weights + slots):
        np.testing.assert_array_equal(old, new)
    assert int(optimizers[1].iterations.numpy()) == 1
    assert any(np.abs(old - new).max() > 0
               for old, new in zip(before[1][0], _state(models[1], optimizers[1])[0]))
    assert cohort.nonfinite_peers() == []


def test_without_skipping_the_divergent_update_is_applied():
    models = [_model(1, "peer1", batch_norm=False), _model(2, "peer2", batch_norm=False)]
    optimizers = [keras.optimizers.SGD(1e38), keras.optimizers.SGD(0.1)]
    cohort = Cohort(models, optimizers, methods.get("independent"), "simultaneous")
    cohort.train_step(*_batch())
    assert not all(np.isfinite(v.numpy()).all() for v in models[0].trainable_variables)
    assert cohort.nonfinite_peers() == [1]


def test_nonfinite_peers_sees_batchnorm_statistics_too():
    models = [_model(1, "peer1"), _model(2, "peer2"), _model(3, "peer3")]
    cohort = Cohort(models, [keras.optimizers.SGD(0.1) for _ in models], methods.get("dml"))
    assert cohort.nonfinite_peers() == []
    bn = models[2].layers[2]
    bn.moving_variance.assign(np.array([1.0, np.inf, 1.0, 1.0], np.float32))
    models[0].trainable_variables[0].assign(np.full((3, 4), np.nan, np.float32))
    assert cohort.nonfinite_peers() == [1, 3]


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_a_dropped_step_puts_back_the_batchnorm_statistics_its_forward_pass_moved(update):
    """Huge (finite) weights make inf activations: the loss is NaN, and the forward pass has
    already written inf into the moving statistics; dropping the step must undo that too."""
    models = [_model(1, "peer1"), _model(2, "peer2")]
    kernel = models[0].layers[1].kernel
    kernel.assign(tf.fill(kernel.shape, 3e38))
    cohort = Cohort(models, [keras.optimizers.SGD(0.1) for _ in models], methods.get("dml"),
                    update, skip_nonfinite=True)
    statistics = [v.numpy().copy() for v in models[0].non_trainable_variables]
    out = cohort.train_step(*_batch())
    assert not np.isfinite(float(out["peer1/loss"]))
    for saved, variable in zip(statistics, models[0].non_trainable_variables):
        np.testing.assert_array_equal(saved, variable.numpy(), err_msg=variable.path)
    assert cohort.nonfinite_peers() == []
