"""The fused BatchNormalization kernel against the batch-norm formulas in numpy and Keras' own."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dml_tf import nets
from dml_tf.nets import fused_batch_norm

EPSILON = 1e-5
MOMENTUM = 0.9


def _images(shape=(4, 5, 6, 3), seed=0):
    return (np.random.default_rng(seed).normal(size=shape) * 3 + 1).astype(np.float32)


def _layer(fused, channels=3, input_shape=(None, 5, 6, 3), **kw):
    layer = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, **kw)
    if fused:
        fused_batch_norm.fuse(keras.Sequential([layer]))
        assert fused_batch_norm.is_fused(layer)
    layer.build(input_shape)
    rng = np.random.default_rng(1)
    layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype(np.float32))
    layer.beta.assign(rng.normal(size=channels).astype(np.float32))
    layer.moving_mean.assign(rng.normal(size=channels).astype(np.float32))
    layer.moving_variance.assign(rng.uniform(0.5, 2, channels).astype(np.float32))
    return layer


def test_training_output_and_moving_statistics_follow_the_formulas():
    x = _images()
    layer = _layer(True)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    old_mean, old_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    y = layer(x, training=True).numpy()
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))  # biased, as Keras 3
    np.testing.assert_allclose(y, gamma * (x - mean) / np.sqrt(var + EPSILON) + beta,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(),
                               MOMENTUM * old_mean + (1 - MOMENTUM) * mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               MOMENTUM * old_var + (1 - MOMENTUM) * var, rtol=1e-5)


def test_inference_uses_the_moving_statistics_and_leaves_them():
    x = _images()
    layer = _layer(True)
    mean, var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    y = layer(x, training=False).numpy()
    np.testing.assert_allclose(
        y, layer.gamma.numpy() * (x - mean) / np.sqrt(var + EPSILON) + layer.beta.numpy(),
        rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)


@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_keras_batch_normalization(training):
    x = tf.constant(_images())
    grads = []
    for fused in (False, True):
        layer = _layer(fused)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            objective = tf.reduce_sum(y * tf.sin(y))  # a non-linear function of every output
        grads.append(tape.gradient(objective, [x, layer.gamma, layer.beta]))
    for keras_grad, fused_grad in zip(*grads):
        np.testing.assert_allclose(fused_grad, keras_grad, rtol=1e-3, atol=1e-3)


def test_bfloat16_activations_keep_float32_statistics():
    x = _images()
    layer = _layer(True, dtype="mixed_bfloat16")
    y = layer(tf.cast(x, tf.bfloat16), training=True)
    assert y.dtype == tf.bfloat16 and layer.moving_mean.dtype == "float32"
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    expected = layer.gamma.numpy() * (x - mean) / np.sqrt(var + EPSILON) + layer.beta.numpy()
    # bfloat16 keeps about 3 significant digits.
    np.testing.assert_allclose(tf.cast(y, tf.float32), expected, rtol=0.02, atol=0.05)


def test_inputs_the_kernel_does_not_take_go_to_keras():
    x = _images((8, 3))  # a batch of vectors: not the 4-D kernel's
    reference = _layer(False, input_shape=(None, 3))
    fused = _layer(True, input_shape=(None, 3))
    np.testing.assert_allclose(fused(x, training=True), reference(x, training=True), rtol=1e-5)


@pytest.mark.parametrize("name", ["resnet32", "mobilenet", "wrn28_10", "tiny"])
def test_every_network_uses_it_and_computes_what_keras_layers_would(name):
    keras.utils.set_random_seed(0)
    # Without dropout, so that training-mode outputs are deterministic.
    options = {"dropout": 0.0} if "dropout" in nets.options(name) else {}
    fused = nets.build(name, 10, (32, 32, 3), **options)
    norms = [layer for layer in fused.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(fused_batch_norm.is_fused(layer) for layer in norms)
    # The builder alone: Keras' own BatchNormalization.
    reference = nets._BUILDERS[name](10, (32, 32, 3), name=name, **options)
    assert not any(fused_batch_norm.is_fused(layer) for layer in reference.layers)
    reference.set_weights(fused.get_weights())
    images = _images((2, 32, 32, 3))
    for training in (False, True):
        np.testing.assert_allclose(fused(images, training=training),
                                   reference(images, training=training), rtol=2e-3, atol=2e-3)
