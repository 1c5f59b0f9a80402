"""ImageNet ResNets of He et al. (2016): ResNet-18 written here, ResNet-50 from Keras.

Both end in global average pooling ("features", 512-d for ResNet-18, 2048-d for
ResNet-50) and a dense classifier ("logits"); KDCL (Guo et al. 2020) reports with both.

ResNet-18 (Keras has none): basic blocks conv3x3-BN-ReLU-conv3x3-BN, add the
shortcut, ReLU; four stages of [2, 2, 2, 2] blocks with 64, 128, 256, 512 filters, the
first block of stages 2-4 halving the resolution with a 1x1 stride-2 conv + BN
projection shortcut (option B, as torchvision). Two stems, chosen by the input size:

* ``min(height, width) >= 128`` (ImageNet): 7x7 stride-2 conv (64) - BN - ReLU -
  3x3 stride-2 max pool, total stride 32 (224 -> 7x7 before the pool). With 1000
  classes: 11,689,512 trainable parameters, torchvision's resnet18 count
  (+ 9,600 BatchNorm moving statistics = 11,699,112 in Keras' count_params).
* smaller inputs (CIFAR): 3x3 stride-1 conv (64) - BN - ReLU, no max pool, total
  stride 8 (32 -> 4x4), as in the widely used CIFAR ResNet-18 (kuangliu/pytorch-cifar,
  which KDCL-style CIFAR work copies). With 100 classes: 11,220,132 trainable
  parameters, that PyTorch model's count.

Strided 3x3 convolutions and the max pool pad one pixel on every side (PyTorch's
padding=1, not Keras' bottom/right "same"), so the stride-2 convolution is centred on
the pixels the 1x1 shortcut keeps. Conventions of the hand-written networks here:
he_normal kernels without biases, BatchNorm momentum 0.9 and epsilon 1e-5 (PyTorch's
defaults), no regularisers (weight decay is added centrally). Keras has no ImageNet
weights for ResNet-18: `weights` takes a path to a `.weights.h5` file saved from this
network (`model.save_weights`).

ResNet-50 is `keras.applications.ResNet50(include_top=False)` as is (bottleneck
blocks [3, 4, 6, 3], convolutions with biases, BatchNorm epsilon 1.001e-5), so
``weights="imagenet"`` loads Keras' published weights; they expect "caffe"
preprocessing (BGR, ImageNet mean subtracted). With 1000 classes: 25,636,712
parameters, the count of Keras' own ResNet50 with its top. Keras' model is kept for
every input size it accepts (sides >= 32): at 32x32 its last stage is 1x1, which
trains, but ``resnet18``'s CIFAR stem is the better choice for small images.
"""

import os

import keras
from keras import layers

from dml_tf.errors import UserError
from dml_tf.nets import mobilenet

IMAGENET_MIN_SIDE = 128
KERAS_MIN_SIDE = 32
_BN = dict(momentum=0.9, epsilon=1e-5)
_INIT = "he_normal"


def _conv(x, filters, kernel, stride, name):
    """Conv without bias; stride 2 pads kernel//2 on every side like PyTorch."""
    if stride == 1:
        return layers.Conv2D(filters, kernel, padding="same", use_bias=False,
                             kernel_initializer=_INIT, name=name)(x)
    x = layers.ZeroPadding2D(kernel // 2, name=name + "_pad")(x)
    return layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False,
                         kernel_initializer=_INIT, name=name)(x)


def _basic_block(x, filters, stride, name):
    y = _conv(x, filters, 3, stride, name + "_1_conv")
    y = layers.BatchNormalization(**_BN, name=name + "_1_bn")(y)
    y = layers.ReLU(name=name + "_1_relu")(y)
    y = _conv(y, filters, 3, 1, name + "_2_conv")
    y = layers.BatchNormalization(**_BN, name=name + "_2_bn")(y)
    if stride == 1 and x.shape[-1] == filters:
        shortcut = x
    else:
        # A 1x1 stride-2 conv keeps pixels 0, 2, 4, ...: no padding needed.
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                 kernel_initializer=_INIT, name=name + "_0_conv")(x)
        shortcut = layers.BatchNormalization(**_BN, name=name + "_0_bn")(shortcut)
    y = layers.Add(name=name + "_add")([shortcut, y])
    return layers.ReLU(name=name + "_out")(y)


def _check_weights_path(network, weights):
    if weights is not None and not os.path.exists(str(weights)):
        raise UserError(f"{network} weights file {weights!r} does not exist; pass None or the "
                        f"path of a weights file saved from a {network} model.")


def resnet18(num_classes, input_shape, *, weights=None, name="resnet18"):
    """Builds ResNet-18 mapping images to logits (ImageNet or CIFAR stem, see module doc).

    Args:
        num_classes: number of logits.
        input_shape: (height, width, channels) of the normalised float32 images;
            ``min(height, width) >= 128`` selects the ImageNet stem.
        weights: None (random init) or the path of a `.weights.h5` file saved from a
            resnet18 built with the same classes and stem.
        name: Keras model name.

    Returns:
        A functional keras.Model; its global average pool is the layer "features".

    Raises:
        UserError: for weights="imagenet" (Keras has none for ResNet-18) or a missing file.
    """
    if weights == "imagenet":
        raise UserError("Keras has no ImageNet weights for resnet18; pass weights=None or "
                        "the path of a .weights.h5 file saved from a resnet18 model.")
    _check_weights_path("resnet18", weights)
    inputs = keras.Input(shape=input_shape, name="images")
    if min(input_shape[:2]) >= IMAGENET_MIN_SIDE:
        x = _conv(inputs, 64, 7, 2, "conv1_conv")
        x = layers.BatchNormalization(**_BN, name="conv1_bn")(x)
        x = layers.ReLU(name="conv1_relu")(x)
        # Zero padding is neutral for a max over ReLU outputs (all >= 0).
        x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
        x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    else:
        x = _conv(inputs, 64, 3, 1, "conv1_conv")
        x = layers.BatchNormalization(**_BN, name="conv1_bn")(x)
        x = layers.ReLU(name="conv1_relu")(x)
    for stage, filters in enumerate((64, 128, 256, 512), start=2):
        for block in (1, 2):
            stride = 2 if stage > 2 and block == 1 else 1
            x = _basic_block(x, filters, stride, f"conv{stage}_block{block}")
    x = layers.GlobalAveragePooling2D(name="features")(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    model = keras.Model(inputs, logits, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model


def resnet50(num_classes, input_shape, *, weights=None, name="resnet50"):
    """Builds keras.applications.ResNet50 (no top) + "features" pool + dense logits.

    Args:
        num_classes: number of logits.
        input_shape: (height, width, channels), sides >= 32 (Keras' minimum).
        weights: None (random init), "imagenet" or the path of a Keras ResNet50
            no-top weights file.
        name: Keras model name.

    Returns:
        A functional keras.Model; its global average pool is the layer "features".

    Raises:
        UserError: for inputs smaller than 32x32, a missing weights file or a failed
            download of the ImageNet weights.
    """
    height, width, channels = input_shape
    if min(height, width) < KERAS_MIN_SIDE:
        raise UserError(f"resnet50 needs inputs of side >= {KERAS_MIN_SIDE}, got "
                        f"{height}x{width}; use resnet18 for smaller images.")
    if weights is not None and channels != 3:
        raise UserError(f"resnet50 weights={weights!r} need 3 input channels, got {channels}.")
    if weights != "imagenet":
        _check_weights_path("resnet50", weights)
    base = mobilenet.keras_application(
        keras.applications.ResNet50, "ResNet50", "resnet50 ..._notop.h5",
        include_top=False, weights=weights, input_shape=tuple(input_shape))
    x = layers.GlobalAveragePooling2D(name="features")(base.output)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(base.input, logits, name=name)
