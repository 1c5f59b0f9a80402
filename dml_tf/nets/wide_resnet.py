"""Wide ResNet of Zagoruyko & Komodakis (2016), "Wide Residual Networks".

WRN-d-k has a 3x3 stem convolution with 16 filters, three groups of (d - 4) / 6
pre-activation wide basic blocks with 16k, 32k and 64k filters (groups 2 and 3 start
with stride 2), a final BN-ReLU, global average pooling and a dense classifier. A
wide basic block is BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 plus a shortcut. Where
the block changes width, the shortcut is a 1x1 convolution applied to the
*pre-activated* input (BN-ReLU shared with the residual branch), as in the authors'
code and the standard PyTorch port (xternalz/WideResNet-pytorch).

WRN-28-10 with 100 classes: 36,536,884 trainable parameters (36,479,194 with 10
classes, the figure the standard implementations print), 36,554,836 counting
BatchNorm moving statistics; the paper's Table 1 says 36.5M. Some PyTorch ports
(e.g. meliketoy/wide-resnet.pytorch) give their convolutions biases and report
36,546,980 = 36,536,884 + 10,096 conv biases; the authors' layout has none.

Conventions: he_normal convolution kernels without biases, BatchNormalization with
momentum 0.9 and epsilon 1e-5 (PyTorch defaults, as in the reference code), no kernel
regularisers (weight decay is added centrally), channels_last.
"""

import keras
from keras import layers

from dml_tf.errors import UserError

_BN = dict(momentum=0.9, epsilon=1e-5)
_INIT = "he_normal"


def _conv(x, filters, kernel, stride, name):
    if stride == 1 or kernel == 1:
        padding = "same" if kernel > 1 else "valid"
        return layers.Conv2D(filters, kernel, strides=stride, padding=padding,
                             use_bias=False, kernel_initializer=_INIT, name=name)(x)
    # Pad 1 on every side like PyTorch (Keras "same" pads bottom/right only for
    # stride 2), so the 3x3 conv stays centred on the pixels the 1x1 shortcut keeps.
    x = layers.ZeroPadding2D(kernel // 2, name=name + "_pad")(x)
    return layers.Conv2D(filters, kernel, strides=stride, padding="valid",
                         use_bias=False, kernel_initializer=_INIT, name=name)(x)


def _wide_block(x, filters, stride, dropout, name):
    pre = layers.BatchNormalization(**_BN, name=name + "_bn1")(x)
    pre = layers.ReLU(name=name + "_relu1")(pre)
    y = _conv(pre, filters, 3, stride, name + "_conv1")
    y = layers.BatchNormalization(**_BN, name=name + "_bn2")(y)
    y = layers.ReLU(name=name + "_relu2")(y)
    if dropout:
        y = layers.Dropout(dropout, name=name + "_dropout")(y)
    y = _conv(y, filters, 3, 1, name + "_conv2")
    if stride == 1 and x.shape[-1] == filters:
        shortcut = x
    else:
        shortcut = _conv(pre, filters, 1, stride, name + "_shortcut")
    return layers.Add(name=name + "_add")([shortcut, y])


def wide_resnet(num_classes, input_shape, *, depth=28, width=10, dropout=0.0,
                name="wrn"):
    """Builds WRN-depth-width.

    Args:
        num_classes: number of logits.
        input_shape: (height, width, channels) of the normalised float32 images.
        depth: 6n+4 layers (16, 22, 28, 40, ...).
        width: widening factor k.
        dropout: dropout rate between the two convolutions of each block
            (Zagoruyko & Komodakis use 0.3 in some experiments; default 0.0).
        name: Keras model name.

    Returns:
        A functional keras.Model mapping images to logits; its global average pool is
        the layer "features".

    Raises:
        UserError: for a depth that is not 6n+4, a width < 1 or a dropout outside [0, 1).
    """
    if (depth - 4) % 6 or depth < 10:
        raise UserError(f"Wide ResNet depth must be 6n+4 (e.g. 16, 28, 40), got {depth}.")
    if int(width) != width or width < 1:
        raise UserError(f"Wide ResNet width must be a positive integer, got {width}.")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"Wide ResNet dropout must be in [0, 1), got {dropout}.")
    blocks = (depth - 4) // 6
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv(inputs, 16, 3, 1, "stem_conv")
    for group, filters in enumerate((16 * width, 32 * width, 64 * width), start=1):
        for block in range(1, blocks + 1):
            stride = 2 if group > 1 and block == 1 else 1
            x = _wide_block(x, filters, stride, dropout, f"group{group}_block{block}")
    x = layers.BatchNormalization(**_BN, name="final_bn")(x)
    x = layers.ReLU(name="final_relu")(x)
    x = layers.GlobalAveragePooling2D(name="features")(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)


def wrn28_10(num_classes, input_shape, *, dropout=0.0, name="wrn28_10"):
    """WRN-28-10 (widths 160/320/640); see `wide_resnet` for the arguments."""
    return wide_resnet(num_classes, input_shape, depth=28, width=10, dropout=dropout,
                       name=name)
