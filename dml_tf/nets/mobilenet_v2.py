"""MobileNetV2 (Sandler et al. 2018), width 1.0 and 0.5, with a pooled embedding.

Layout, as `keras.applications.MobileNetV2(include_top=False)`: conv3x3/2 (32α) -
BN - ReLU6, 17 inverted-residual blocks (expand 1x1 - depthwise 3x3 - linear project
1x1, residual add where the shape allows) with 16, 24x2, 32x3, 64x4, 96x3, 160x3, 320
output filters (times α, rounded to multiples of 8), conv1x1 (1280) - BN - ReLU6, then
global average pooling ("features", 1280-d) and a dense classifier ("logits"), as
Keras' own top (no dropout). KDCL (Guo et al. 2020) pairs it with ResNet-50 (α 1.0)
and ResNet-18 (α 0.5) on ImageNet.

Two variants, chosen by the input size (as `mobilenet` does for v1):

* ``min(height, width) >= 128`` (ImageNet): `keras.applications.MobileNetV2` is reused
  as is, so ``weights="imagenet"`` loads Keras' published weights (images scaled to
  [-1, 1]). Parameters with 1000 classes equal Keras' own model with its top:
  3,538,984 for α 1.0 and 1,987,224 for α 0.5.
* smaller inputs (CIFAR 32x32): Keras' model accepts 32x32, but its five stride-2
  stages leave a 1x1 map before the pool. As in the widely used CIFAR MobileNetV2
  (kuangliu/pytorch-cifar), two strides change from 2 to 1: the stem ``Conv1`` and the
  first strided block ``block_1``; total stride 8, so 32x32 reaches the pool at 4x4.
  The layers are written here with Keras' names and shapes (same parameter count,
  weights copyable by name), he_normal kernels and BatchNorm momentum 0.9 (the
  convention of the hand-written networks here) with Keras' epsilon 1e-3.
"""


import keras
from keras import layers

from dml_tf.nets import mobilenet

IMAGENET_MIN_SIDE = 128
# (expansion, output filters, stride) of the 17 inverted-residual blocks, block_0..16.
_BLOCKS = (
    (1, 16, 1),
    (6, 24, 2), (6, 24, 1),
    (6, 32, 2), (6, 32, 1), (6, 32, 1),
    (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
    (6, 96, 1), (6, 96, 1), (6, 96, 1),
    (6, 160, 2), (6, 160, 1), (6, 160, 1),
    (6, 320, 1),
)
# Blocks whose stride becomes 1 in the small-input variant (the stem does too).
_SMALL_INPUT_UNSTRIDED_BLOCKS = (1,)
_BN = dict(momentum=0.9, epsilon=1e-3)
_INIT = "he_normal"


def _make_divisible(v, divisor=8):
    """Keras' (and the paper's reference code's) rounding of channel counts."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _inverted_residual(x, expansion, filters, stride, alpha, block_id):
    in_channels = x.shape[-1]
    out_channels = _make_divisible(int(filters * alpha))
    prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
    y = x
    if block_id:
        y = layers.Conv2D(expansion * in_channels, 1, use_bias=False, kernel_initializer=_INIT,
                          name=prefix + "expand")(y)
        y = layers.BatchNormalization(**_BN, name=prefix + "expand_BN")(y)
        y = layers.ReLU(6.0, name=prefix + "expand_relu")(y)
    if stride == 2:
        # Keras' correct_pad: one pixel bottom/right, and top/left too on an odd side.
        y = layers.ZeroPadding2D(((y.shape[1] % 2, 1), (y.shape[2] % 2, 1)),
                                 name=prefix + "pad")(y)
    y = layers.DepthwiseConv2D(3, strides=stride, padding="same" if stride == 1 else "valid",
                               use_bias=False, depthwise_initializer=_INIT,
                               name=prefix + "depthwise")(y)
    y = layers.BatchNormalization(**_BN, name=prefix + "depthwise_BN")(y)
    y = layers.ReLU(6.0, name=prefix + "depthwise_relu")(y)
    y = layers.Conv2D(out_channels, 1, use_bias=False, kernel_initializer=_INIT,
                      name=prefix + "project")(y)
    y = layers.BatchNormalization(**_BN, name=prefix + "project_BN")(y)
    if in_channels == out_channels and stride == 1:
        return layers.Add(name=prefix + "add")([x, y])
    return y


def _small_input_base(inputs, alpha):
    """Conv1 + 17 blocks + Conv_1, layer for layer like Keras' MobileNetV2, strides 8."""
    x = layers.Conv2D(_make_divisible(32 * alpha), 3, padding="same", use_bias=False,
                      kernel_initializer=_INIT, name="Conv1")(inputs)
    x = layers.BatchNormalization(**_BN, name="bn_Conv1")(x)
    x = layers.ReLU(6.0, name="Conv1_relu")(x)
    for block_id, (expansion, filters, stride) in enumerate(_BLOCKS):
        if block_id in _SMALL_INPUT_UNSTRIDED_BLOCKS:
            stride = 1
        x = _inverted_residual(x, expansion, filters, stride, alpha, block_id)
    last = _make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    x = layers.Conv2D(last, 1, use_bias=False, kernel_initializer=_INIT, name="Conv_1")(x)
    x = layers.BatchNormalization(**_BN, name="Conv_1_bn")(x)
    return layers.ReLU(6.0, name="out_relu")(x)


def _mobilenet_v2(num_classes, input_shape, *, alpha, weights, name):
    imagenet_size = mobilenet.check_weights("MobileNetV2", weights, input_shape, IMAGENET_MIN_SIDE)
    if imagenet_size:
        base = mobilenet.keras_application(
            keras.applications.MobileNetV2, "MobileNetV2", "mobilenet_v2_..._no_top.h5",
            input_shape=tuple(input_shape), alpha=alpha, include_top=False, weights=weights)
        inputs, x = base.input, base.output
    else:
        inputs = keras.Input(shape=input_shape, name="images")
        x = _small_input_base(inputs, alpha)
    x = layers.GlobalAveragePooling2D(name="features")(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)


def mobilenet_v2(num_classes, input_shape, *, weights=None, name="mobilenet_v2"):
    """Builds MobileNetV2, width 1.0, mapping images to logits (see module doc).

    Args:
        num_classes: number of logits.
        input_shape: (height, width, channels) of the normalised float32 images;
            ``min(height, width) >= 128`` selects the keras.applications model.
        weights: None (random init), "imagenet" or a path to a Keras MobileNetV2
            no-top weights file; only for inputs of side >= 128.
        name: Keras model name.

    Returns:
        A functional keras.Model; its global average pool is the layer "features".

    Raises:
        UserError: if weights are asked for a small or non-RGB input, or are missing.
    """
    return _mobilenet_v2(num_classes, input_shape, alpha=1.0, weights=weights, name=name)


def mobilenet_v2_050(num_classes, input_shape, *, weights=None, name="mobilenet_v2_050"):
    """MobileNetV2 with width multiplier α = 0.5; see `mobilenet_v2`."""
    return _mobilenet_v2(num_classes, input_shape, alpha=0.5, weights=weights, name=name)
