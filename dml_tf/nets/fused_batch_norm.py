"""BatchNormalization on TensorFlow's fused kernel (`nets.build` puts it in every network).

Keras 3 computes BatchNormalization from separate moments, subtractions and products and
differentiates through each of them; TensorFlow's `FusedBatchNormV3` does the forward and
backward passes in one kernel each (oneDNN on x86 CPUs, cuDNN on GPUs) and takes bfloat16
or float16 activations with float32 statistics, so mixed precision needs no casts around
it. Measured on the 2-core CPU (bench/cohort_options.py, bench/RESULTS.md), a DML pair of
ResNet-32s trains 1.06x faster with it in float32 and 1.30x faster in mixed bfloat16.

The fused computation replaces the `call` of each `keras.layers.BatchNormalization`
instance; the layers stay Keras' own class, so weights files and saved models are those of
plain Keras networks (loadable into `keras.applications` models and back). It computes
what Keras' does, to float rounding: the moving statistics are updated with the biased
batch variance, as Keras 3 does (the kernel returns the Bessel-corrected one, which is
undone). Cases the kernel does not cover (inputs other than 4-D with the channels last,
masks, renormalisation, synchronised statistics) go to Keras' own code.
"""

import functools

import keras
import tensorflow as tf


def fused_call(layer, inputs, training=None, mask=None):
    """`layer.call` (a keras.layers.BatchNormalization) computed by FusedBatchNormV3."""
    fusable = (keras.backend.backend() == "tensorflow" and mask is None and not layer.renorm
               and not layer.synchronized and len(inputs.shape) == 4 and layer.axis in (-1, 3))
    if not fusable:
        return keras.layers.BatchNormalization.call(layer, inputs, training=training, mask=mask)
    x = tf.cast(inputs, layer.compute_dtype)
    channels = x.shape[-1]
    scale = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels], tf.float32)
    offset = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels], tf.float32)
    moving_mean = tf.cast(layer.moving_mean, tf.float32)
    moving_variance = tf.cast(layer.moving_variance, tf.float32)
    if not (training and layer.trainable):
        # Inference (or a frozen layer, as in Keras): normalise with the moving statistics.
        return tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=moving_mean, variance=moving_variance,
            epsilon=layer.epsilon, data_format="NHWC", is_training=False)[0]
    # Empty mean/variance inputs: the kernel computes the batch statistics itself.
    empty = tf.constant([], tf.float32)
    y, batch_mean, corrected_variance = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty,
        epsilon=layer.epsilon, data_format="NHWC", is_training=True)[:3]
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
    batch_variance = corrected_variance * (count - 1.0) / tf.maximum(count, 1.0)
    momentum = layer.momentum
    layer.moving_mean.assign(tf.cast(
        moving_mean * momentum + tf.stop_gradient(batch_mean) * (1.0 - momentum),
        layer.moving_mean.dtype))
    layer.moving_variance.assign(tf.cast(
        moving_variance * momentum + tf.stop_gradient(batch_variance) * (1.0 - momentum),
        layer.moving_variance.dtype))
    return y


def is_fused(layer):
    return getattr(layer.call, "func", None) is fused_call


def fuse(model):
    """Makes every keras.layers.BatchNormalization of `model` (nested models included)
    compute with the fused kernel, in place; returns `model`."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            fuse(layer)
        elif type(layer) is keras.layers.BatchNormalization and not is_fused(layer):
            layer.call = functools.partial(fused_call, layer)
    return model
