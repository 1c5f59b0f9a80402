"""A tiny convnet for tests and quick smoke runs, not for results.

conv3x3(8)-BN-ReLU, conv3x3/2(16)-ReLU, global average pooling ("features", 16-d),
dense. 3,116 parameters with 100 classes; any input side >= 8 works. It keeps one
BatchNorm layer so tests exercise the training/inference difference.
"""

import keras
from keras import layers


def tiny(num_classes, input_shape, *, name="tiny"):
    """Builds the tiny test network.

    Args:
        num_classes: number of logits.
        input_shape: (height, width, channels) of the float32 images.
        name: Keras model name.

    Returns:
        A functional keras.Model mapping images to logits; its global average pool is
        the layer "features".
    """
    inputs = keras.Input(shape=input_shape, name="images")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                      name="conv1")(inputs)
    x = layers.BatchNormalization(momentum=0.9, name="conv1_bn")(x)
    x = layers.ReLU(name="conv1_relu")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", kernel_initializer="he_normal",
                      name="conv2")(x)
    x = layers.ReLU(name="conv2_relu")(x)
    x = layers.GlobalAveragePooling2D(name="features")(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)
