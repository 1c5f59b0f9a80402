"""The networks KDCL reports with: ResNet-18, ResNet-50, MobileNetV2 (width 1.0 and 0.5).

Reference counts: torchvision's resnet18 (11,689,512 parameters, 1000 classes), the
common PyTorch CIFAR ResNet-18 (11,220,132, 100 classes), and Keras' own ResNet50
(25,636,712) and MobileNetV2 (3,538,984 for α 1.0, 1,987,224 for α 0.5) with their tops.
PyTorch counts parameters only, so they are compared with the trainable weights
(BatchNorm moving statistics are buffers there); Keras' counts include them.
"""

import functools

import keras
import numpy as np
import pytest

from dml_tf import nets
from dml_tf.errors import UserError

KDCL_NETS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v2_050")


def trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


@functools.lru_cache(maxsize=None)
def built(name, num_classes, input_shape):
    """Builds each configuration once per test session."""
    return nets.build(name, num_classes, input_shape)


def resnet18_hand_count(num_classes, stem_kernel):
    """(trainable, BatchNorm moving statistics) from He et al.'s Table 1, 18-layer column."""
    convs = stem_kernel ** 2 * 3 * 64
    bn_channels = 64
    cin = 64
    for filters in (64, 128, 256, 512):
        for block in (1, 2):
            convs += 9 * cin * filters + 9 * filters * filters
            bn_channels += 2 * filters
            if cin != filters:  # projection shortcut
                convs += cin * filters
                bn_channels += filters
            cin = filters
    return convs + 2 * bn_channels + 512 * num_classes + num_classes, 2 * bn_channels


def test_resnet18_imagenet_count_and_stem():
    model = built("resnet18", 1000, (224, 224, 3))
    assert trainable(model) == 11_689_512  # torchvision resnet18
    assert (trainable(model), model.count_params() - trainable(model)) == resnet18_hand_count(1000, 7)
    assert model.get_layer("conv1_conv").strides == (2, 2)
    assert model.get_layer("pool1_pool").output.shape[1:3] == (56, 56)
    assert model.get_layer("features").input.shape[1:] == (7, 7, 512)


def test_resnet18_cifar_stem_count():
    model = built("resnet18", 100, (32, 32, 3))
    assert trainable(model) == 11_220_132  # kuangliu/pytorch-cifar ResNet18
    assert (trainable(model), model.count_params() - trainable(model)) == resnet18_hand_count(100, 3)
    assert model.get_layer("conv1_conv").strides == (1, 1)
    assert not any(isinstance(l, keras.layers.MaxPooling2D) for l in model.layers)
    assert model.get_layer("features").input.shape[1:] == (4, 4, 512)


def test_resnet50_count_equals_keras():
    model = built("resnet50", 1000, (224, 224, 3))
    assert model.count_params() == 25_636_712  # keras.applications.ResNet50(weights=None)
    assert model.get_layer("features").input.shape[1:] == (7, 7, 2048)
    assert model.get_layer("conv5_block3_out") is not None  # Keras' own layers


@pytest.mark.parametrize("name,count", [("mobilenet_v2", 3_538_984),
                                        ("mobilenet_v2_050", 1_987_224)])
@pytest.mark.parametrize("side", [224, 32])
def test_mobilenet_v2_count_equals_keras(name, count, side):
    model = built(name, 1000, (side, side, 3))
    assert model.count_params() == count
    # ImageNet: Keras' strides (7x7 at the pool); CIFAR: stem and block_1 unstrided (4x4).
    assert model.get_layer("features").input.shape[1:] == (side // (32 if side == 224 else 8),) * 2 + (1280,)


def test_mobilenet_v2_small_input_mirrors_keras_layers():
    model = built("mobilenet_v2_050", 1000, (32, 32, 3))
    reference = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.5,
                                               include_top=False, weights=None)
    ours = {l.name: l for l in model.layers}
    for layer in reference.layers[1:]:
        if layer.name == "block_1_pad":  # block_1 is unstrided here: no padding layer
            assert layer.name not in ours
            continue
        assert [w.shape for w in ours[layer.name].weights] == [w.shape for w in layer.weights]
    assert ours["Conv1"].strides == (1, 1) and ours["block_1_depthwise"].strides == (1, 1)
    assert ours["block_3_depthwise"].strides == (2, 2)


@pytest.mark.parametrize("name", KDCL_NETS)
def test_cifar_forward_pass_logits_and_features(name):
    model = built(name, 10, (32, 32, 3))
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    logits = model(images, training=False)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    features = model.get_layer("features")
    assert isinstance(features, keras.layers.GlobalAveragePooling2D)
    assert model.layers[-1].name == "logits"
    embed = keras.Model(model.input, features.output)
    assert embed(images).shape == (2, features.output.shape[-1])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2_050"])
def test_imagenet_variant_forward_pass(name):
    # 128 is the smallest side that selects the ImageNet layout.
    model = nets.build(name, 7, (128, 128, 3))
    assert model.get_layer("features").input.shape[1:3] == (4, 4)
    logits = model(np.zeros((1, 128, 128, 3), np.float32), training=False)
    assert logits.shape == (1, 7)


def test_registry_and_options():
    assert set(KDCL_NETS) <= set(nets.NAMES)
    for name in KDCL_NETS:
        assert nets.options(name) == ("weights",)
    assert built("resnet18", 10, (32, 32, 3)).name == "resnet18"  # the default model name


def test_weights_errors():
    with pytest.raises(UserError, match="no ImageNet weights for resnet18"):
        nets.build("resnet18", 10, weights="imagenet")
    with pytest.raises(UserError, match="does not exist"):
        nets.build("resnet18", 10, weights="/no/such.weights.h5")
    with pytest.raises(UserError, match="does not exist"):
        nets.build("resnet50", 10, weights="/no/such.h5")
    with pytest.raises(UserError, match="side >= 32"):
        nets.build("resnet50", 10, (16, 16, 3))
    with pytest.raises(UserError, match="128"):
        nets.build("mobilenet_v2", 10, weights="imagenet")


def test_resnet18_weights_file_round_trip(tmp_path):
    model = built("resnet18", 10, (32, 32, 3))
    path = str(tmp_path / "resnet18.weights.h5")
    model.save_weights(path)
    loaded = nets.build("resnet18", 10, (32, 32, 3), weights=path)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(images, training=False), model(images, training=False),
                               rtol=1e-5, atol=1e-5)
