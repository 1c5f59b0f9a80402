"""MobileNet v1, width multiplier 1.0 (Howard et al. 2017), with a 1024-d pooled embedding.

Layout: conv3x3(32)-BN-ReLU6, then 13 depthwise-separable blocks (depthwise 3x3-BN-ReLU6,
pointwise 1x1-BN-ReLU6) with 64, 128, 128, 256, 256, 512 (x6), 1024, 1024 filters,
global average pooling ("features", 1024-d), dropout and a dense classifier.

Two variants, chosen by the input size:

* ``min(height, width) >= 128`` (ImageNet, Market-1501 at 224x224):
  `keras.applications.MobileNet(include_top=False, alpha=1.0)` is reused as is, so
  ``weights="imagenet"`` (or a path to a weights file) loads the published ImageNet
  weights. Its layers are Keras' own: glorot_uniform kernels, BatchNorm momentum 0.99,
  epsilon 1e-3; images should be scaled to [-1, 1] as the ImageNet weights expect.
* smaller inputs (CIFAR 32x32): the same layers with the same names, written here,
  with two strides changed from 2 to 1: the stem convolution ``conv1`` and the first
  strided depthwise block ``conv_dw_2``. The total stride is 8 instead of 32, so a
  32x32 image reaches the pool at 4x4 (not 1x1). These layers use he_normal kernels
  and BatchNorm momentum 0.9 (the PyTorch-equivalent used by all hand-written nets
  here) with Keras' epsilon 1e-3. Because names and shapes match the Keras model,
  weights can be copied layer by layer between the two variants.

Parameters with 100 classes, both variants: 3,228,864 in the base (3,206,976
trainable + 21,888 BatchNorm moving statistics) + 102,500 in the classifier
= 3,331,364, the paper's Table 1 "3.3M".

Dropout defaults to 1e-3 in both variants, the rate of Keras' MobileNet and of
TF-slim's mobilenet_v1 (keep probability 0.999) that the authors' code used.
"""

import os

import keras
from keras import layers

from dml_tf.errors import UserError

# (pointwise filters, stride) of the 13 depthwise-separable blocks of MobileNet v1.
_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
# Strides set to 1 in the small-input variant: the stem and block 2.
_SMALL_INPUT_UNSTRIDED_BLOCKS = (2,)
IMAGENET_MIN_SIDE = 128
_BN = dict(momentum=0.9, epsilon=1e-3)
_INIT = "he_normal"


def _small_input_base(inputs):
    """conv1 + 13 blocks, layer for layer like keras.applications.MobileNet."""
    x = layers.Conv2D(32, 3, padding="same", use_bias=False, kernel_initializer=_INIT,
                      name="conv1")(inputs)
    x = layers.BatchNormalization(**_BN, name="conv1_bn")(x)
    x = layers.ReLU(6.0, name="conv1_relu")(x)
    for block_id, (filters, stride) in enumerate(_BLOCKS, start=1):
        if block_id in _SMALL_INPUT_UNSTRIDED_BLOCKS:
            stride = 1
        if stride == 1:
            padding = "same"
        else:
            # TF-style asymmetric padding, as in keras.applications.MobileNet.
            x = layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"conv_pad_{block_id}")(x)
            padding = "valid"
        x = layers.DepthwiseConv2D(3, strides=stride, padding=padding, use_bias=False,
                                   depthwise_initializer=_INIT,
                                   name=f"conv_dw_{block_id}")(x)
        x = layers.BatchNormalization(**_BN, name=f"conv_dw_{block_id}_bn")(x)
        x = layers.ReLU(6.0, name=f"conv_dw_{block_id}_relu")(x)
        x = layers.Conv2D(filters, 1, use_bias=False, kernel_initializer=_INIT,
                          name=f"conv_pw_{block_id}")(x)
        x = layers.BatchNormalization(**_BN, name=f"conv_pw_{block_id}_bn")(x)
        x = layers.ReLU(6.0, name=f"conv_pw_{block_id}_relu")(x)
    return x


def check_weights(network, weights, input_shape, min_side):
    """Validates a keras.applications `weights` argument; True where the ImageNet model applies.

    Shared by the networks that wrap keras.applications (MobileNet, MobileNetV2).

    Raises:
        UserError: weights for a small-input variant, for non-RGB inputs, or a missing file.
    """
    height, width, channels = input_shape
    imagenet_size = min(height, width) >= min_side
    if weights is not None and not imagenet_size:
        raise UserError(
            f"{network} weights={weights!r} need inputs of side >= {min_side}, got "
            f"{height}x{width}; the small-input variant trains from scratch.")
    if weights is not None and channels != 3:
        raise UserError(f"{network} weights={weights!r} need 3 input channels, got {channels}.")
    if weights not in (None, "imagenet") and not os.path.exists(str(weights)):
        raise UserError(f"{network} weights file {weights!r} does not exist; pass None, "
                        f"'imagenet' or the path of a Keras {network} no-top weights file.")
    return imagenet_size


def keras_application(constructor, network, weights_file, **kwargs):
    """`constructor(**kwargs)` (a keras.applications model); a failed weights download is a
    UserError saying what to do instead.

    Shared by the networks that wrap keras.applications (MobileNet, MobileNetV2, ResNet-50).
    `weights_file` names the no-top weights file a user can pass instead.
    """
    try:
        return constructor(**kwargs)
    except Exception as e:  # Keras raises a bare Exception when the download fails.
        if "URL fetch failure" not in str(e):
            raise
        raise UserError(f"Could not download the ImageNet {network} weights; connect to the "
                        f"network or pass weights=<path to {weights_file}>.") from e


def mobilenet(num_classes, input_shape, *, dropout=1e-3, weights=None, name="mobilenet"):
    """Builds MobileNet v1 (alpha 1.0) mapping images to logits.

    Args:
        num_classes: number of logits.
        input_shape: (height, width, channels) of the normalised float32 images.
            ``min(height, width) >= 128`` selects the keras.applications model.
        dropout: dropout rate before the classifier.
        weights: None (random init), "imagenet" or a path to a Keras MobileNet
            no-top weights file; only for inputs of side >= 128.
        name: Keras model name.

    Returns:
        A functional keras.Model; its global average pool is the layer "features".

    Raises:
        UserError: if weights are asked for a small input or a non-RGB input, or
            dropout is outside [0, 1).
    """
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"MobileNet dropout must be in [0, 1), got {dropout}.")
    imagenet_size = check_weights("MobileNet", weights, input_shape, IMAGENET_MIN_SIDE)
    if imagenet_size:
        base = keras_application(
            keras.applications.MobileNet, "MobileNet", "mobilenet_1_0_224_tf_no_top.h5",
            input_shape=tuple(input_shape), alpha=1.0, include_top=False, weights=weights)
        inputs, x = base.input, base.output
    else:
        inputs = keras.Input(shape=input_shape, name="images")
        x = _small_input_base(inputs)
    x = layers.GlobalAveragePooling2D(name="features")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)
