"""CIFAR ResNet of He et al. (2016), "Deep Residual Learning for Image Recognition", Sec. 4.2.

The network is the 6n+2 CIFAR design with n = 5 (ResNet-32): a 3x3 stem convolution
with 16 filters, three stages of n basic blocks with 16, 32 and 64 filters (the first
block of stages 2 and 3 halves the resolution), global average pooling and a dense
classifier. Blocks are post-activation: conv-BN-ReLU-conv-BN, add the shortcut, ReLU.

Shortcuts default to He et al.'s option A, the one they use on CIFAR: identity, and
where the shape changes, the input subsampled by 2 and zero-padded with the missing
channels (no parameters). With 100 classes this gives 470,004 trainable parameters
(472,276 counting BatchNorm moving statistics), i.e. the paper's Table 1 "0.5M";
He et al. report 0.46M for the 10-class model. Option B (1x1 conv + BN projection
where the shape changes) adds 2,752 trainable parameters and is available as
`shortcut="B"`.

Conventions shared with the other hand-written networks: he_normal convolution
kernels without biases, BatchNormalization with momentum 0.9 and epsilon 1e-5 (the
PyTorch defaults, because the reference CIFAR ResNets are PyTorch), no kernel
regularisers (weight decay is added centrally as an L2 loss), channels_last.
"""

import keras
from keras import layers

from dml_tf.errors import UserError

_BN = dict(momentum=0.9, epsilon=1e-5)
_INIT = "he_normal"


@keras.saving.register_keras_serializable(package="dml_tf")
class ZeroPadShortcut(layers.Layer):
    """He et al.'s option-A shortcut: spatial subsampling plus zero channel padding.

    The new channels are split evenly before and after the existing ones, as in the
    widely used PyTorch re-implementation (akamaster/pytorch_resnet_cifar10); where
    they go does not matter for a model trained from scratch.

    Args:
        channels: number of output channels (>= input channels).
        stride: spatial subsampling factor; keeps pixels 0, stride, 2*stride, ...,
            the same pixels a padding-1 3x3 convolution with this stride is centred on.
    """

    def __init__(self, channels, stride, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.stride = stride

    def call(self, x):
        x = x[:, :: self.stride, :: self.stride, :]
        missing = self.channels - x.shape[-1]
        before = missing // 2
        return keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [before, missing - before]])

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        s = self.stride

        def sub(n):
            return None if n is None else -(-n // s)

        return (batch, sub(height), sub(width), self.channels)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "stride": self.stride}


def _conv3x3(x, filters, stride, name):
    if stride == 1:
        return layers.Conv2D(filters, 3, padding="same", use_bias=False,
                             kernel_initializer=_INIT, name=name)(x)
    # Keras "same" padding with stride 2 pads only bottom/right, which would put the
    # conv one pixel off the subsampled shortcut; pad 1 on every side like PyTorch.
    x = layers.ZeroPadding2D(1, name=name + "_pad")(x)
    return layers.Conv2D(filters, 3, strides=stride, padding="valid", use_bias=False,
                         kernel_initializer=_INIT, name=name)(x)


def _basic_block(x, filters, stride, shortcut, name):
    in_channels = x.shape[-1]
    y = _conv3x3(x, filters, stride, name + "_conv1")
    y = layers.BatchNormalization(**_BN, name=name + "_bn1")(y)
    y = layers.ReLU(name=name + "_relu1")(y)
    y = _conv3x3(y, filters, 1, name + "_conv2")
    y = layers.BatchNormalization(**_BN, name=name + "_bn2")(y)
    if stride == 1 and in_channels == filters:
        s = x
    elif shortcut == "A":
        s = ZeroPadShortcut(filters, stride, name=name + "_shortcut")(x)
    else:
        s = layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                          kernel_initializer=_INIT, name=name + "_shortcut")(x)
        s = layers.BatchNormalization(**_BN, name=name + "_shortcut_bn")(s)
    y = layers.Add(name=name + "_add")([s, y])
    return layers.ReLU(name=name + "_out")(y)


def resnet_cifar(num_classes, input_shape, *, depth=32, shortcut="A", name="resnet"):
    """Builds a 6n+2-layer CIFAR ResNet.

    Args:
        num_classes: number of logits.
        input_shape: (height, width, channels) of the normalised float32 images.
        depth: 6n+2 layers (20, 32, 44, 56, 110, ...).
        shortcut: "A" (zero-padding identity, He et al.'s CIFAR choice) or "B"
            (1x1 projection + BN where the shape changes).
        name: Keras model name.

    Returns:
        A functional keras.Model mapping images to logits; its global average pool is
        the layer "features".

    Raises:
        UserError: for a depth that is not 6n+2 or an unknown shortcut option.
    """
    if (depth - 2) % 6 or depth < 8:
        raise UserError(f"ResNet depth must be 6n+2 (e.g. 20, 32, 56), got {depth}.")
    if shortcut not in ("A", "B"):
        raise UserError(f"ResNet shortcut must be 'A' or 'B', got {shortcut!r}.")
    blocks = (depth - 2) // 6
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv3x3(inputs, 16, 1, "stem_conv")
    x = layers.BatchNormalization(**_BN, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, blocks + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, filters, stride, shortcut, f"stage{stage}_block{block}")
    x = layers.GlobalAveragePooling2D(name="features")(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)


def resnet32(num_classes, input_shape, *, shortcut="A", name="resnet32"):
    """ResNet-32 (n = 5) of He et al.; see `resnet_cifar` for the arguments."""
    return resnet_cifar(num_classes, input_shape, depth=32, shortcut=shortcut, name=name)
