"""GoogLeNet / Inception v1 (Szegedy et al. 2015, "Going deeper with convolutions") with BN.

Filter numbers are those of the GoogLeNet table (Szegedy et al., Table 1). As in
TF-slim's inception_v1 (used by the DML authors' code), every convolution is followed
by BatchNorm (centre only, no scale: the following ReLU and convolution make a scale
redundant) and ReLU, local response normalisation is dropped, and there are no
auxiliary classifiers. The head is global average pooling ("features", 1024-d),
dropout and a dense classifier. Layer names follow TF-slim's scopes with "_" for "/".

The third inception branch uses 5x5 convolutions as in the GoogLeNet table by default;
TF-slim's inception_v1 (and so the authors' released code) uses 3x3 there, available
as ``branch2_kernel=3``.

Stem, chosen by the input size:

* ``min(height, width) >= 128`` (ImageNet, Market-1501 at 224x224): the standard stem
  conv7x7/2(64)-maxpool3x3/2-conv1x1(64)-conv3x3(192)-maxpool3x3/2, total stride 32
  (7x7 before the pool at 224x224).
* smaller inputs (CIFAR 32x32): the same layers, but ``Conv2d_1a_7x7`` has stride 1
  and ``MaxPool_3a_3x3`` is left out, for a total stride of 8: Mixed_3 runs at 16x16,
  Mixed_4 at 8x8, Mixed_5 at 4x4, like the other CIFAR networks here. The parameters
  are the same as at 224.

Parameters with 100 classes (measured, equal to the hand count in tests/nets_test.py):
6,090,612 (6,076,052 trainable + 14,560 BatchNorm moving statistics); with
``branch2_kernel=3`` 5,709,684. The paper's Table 1 gives 7.8M, 1.7M (22%) more.
The gap is not a choice made here: the GoogLeNet body alone (all convolutions,
no aux heads) has 5.97M weights at its published widths, so with a 100-way classifier
no faithful GoogLeNet reaches 7.8M; including the two auxiliary heads would give
about 10.6M. The paper does not say what it counted.

Conventions: he_normal kernels without biases, BatchNorm momentum 0.9 and epsilon 1e-3
(TF-slim's epsilon), no kernel regularisers (weight decay is added centrally),
channels_last. Dropout defaults to 0.2 (TF-slim's keep probability 0.8; GoogLeNet
used 0.4).
"""

import keras
from keras import layers

from dml_tf.errors import UserError

# name: (input of 1x1 branch, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection),
# Szegedy et al., Table 1.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
IMAGENET_MIN_SIDE = 128
_BN = dict(momentum=0.9, epsilon=1e-3, scale=False)
_INIT = "he_normal"


def _conv_bn_relu(x, filters, kernel, name, stride=1):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      kernel_initializer=_INIT, name=name)(x)
    x = layers.BatchNormalization(**_BN, name=name + "_bn")(x)
    return layers.ReLU(name=name + "_relu")(x)


def _max_pool(x, name, stride=2):
    return layers.MaxPooling2D(3, strides=stride, padding="same", name=name)(x)


def _mixed(x, name, branch2_kernel):
    b0, b1_reduce, b1, b2_reduce, b2, b3 = _MIXED[name]
    branch_0 = _conv_bn_relu(x, b0, 1, f"{name}_Branch_0_Conv2d_0a_1x1")
    branch_1 = _conv_bn_relu(x, b1_reduce, 1, f"{name}_Branch_1_Conv2d_0a_1x1")
    branch_1 = _conv_bn_relu(branch_1, b1, 3, f"{name}_Branch_1_Conv2d_0b_3x3")
    k = branch2_kernel
    branch_2 = _conv_bn_relu(x, b2_reduce, 1, f"{name}_Branch_2_Conv2d_0a_1x1")
    branch_2 = _conv_bn_relu(branch_2, b2, k, f"{name}_Branch_2_Conv2d_0b_{k}x{k}")
    branch_3 = _max_pool(x, f"{name}_Branch_3_MaxPool_0a_3x3", stride=1)
    branch_3 = _conv_bn_relu(branch_3, b3, 1, f"{name}_Branch_3_Conv2d_0b_1x1")
    return layers.Concatenate(name=name)([branch_0, branch_1, branch_2, branch_3])


def inception_v1(num_classes, input_shape, *, dropout=0.2, branch2_kernel=5,
                 name="inception_v1"):
    """Builds Inception v1 with BatchNorm mapping images to logits.

    Args:
        num_classes: number of logits.
        input_shape: (height, width, channels) of the normalised float32 images;
            ``min(height, width) >= 128`` selects the standard ImageNet stem.
        dropout: dropout rate before the classifier.
        branch2_kernel: 5 (GoogLeNet) or 3 (TF-slim) for the third branch.
        name: Keras model name.

    Returns:
        A functional keras.Model; its global average pool is the layer "features".

    Raises:
        UserError: for a branch2_kernel other than 3 or 5 or dropout outside [0, 1).
    """
    if branch2_kernel not in (3, 5):
        raise UserError(f"Inception v1 branch2_kernel must be 3 or 5, got {branch2_kernel}.")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"Inception v1 dropout must be in [0, 1), got {dropout}.")
    imagenet_size = min(input_shape[0], input_shape[1]) >= IMAGENET_MIN_SIDE
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv_bn_relu(inputs, 64, 7, "Conv2d_1a_7x7", stride=2 if imagenet_size else 1)
    x = _max_pool(x, "MaxPool_2a_3x3")
    x = _conv_bn_relu(x, 64, 1, "Conv2d_2b_1x1")
    x = _conv_bn_relu(x, 192, 3, "Conv2d_2c_3x3")
    if imagenet_size:
        x = _max_pool(x, "MaxPool_3a_3x3")
    x = _mixed(x, "Mixed_3b", branch2_kernel)
    x = _mixed(x, "Mixed_3c", branch2_kernel)
    x = _max_pool(x, "MaxPool_4a_3x3")
    for block in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
        x = _mixed(x, block, branch2_kernel)
    x = _max_pool(x, "MaxPool_5a_3x3")
    x = _mixed(x, "Mixed_5b", branch2_kernel)
    x = _mixed(x, "Mixed_5c", branch2_kernel)
    x = layers.GlobalAveragePooling2D(name="features")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)
