"""Tests for dml_tf.nets: parameter counts against hand counts, shapes, registry errors.

Hand counts are written out from the architectures' published tables, not by calling
the network code. Each count is a pair (trainable, non_trainable); BatchNorm has
trainable gamma/beta and non-trainable moving mean/variance.
"""

import functools

import keras
import numpy as np
import pytest

from dml_tf import nets
from dml_tf.errors import UserError


def conv(k, cin, cout, bias=False):
    return (k * k * cin * cout + (cout if bias else 0), 0)


def bn(c, scale=True):
    return ((2 if scale else 1) * c, 2 * c)


def dense(cin, cout):
    return (cin * cout + cout, 0)


def total(*parts):
    return tuple(map(sum, zip(*parts)))


def measured(model):
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    return (trainable, model.count_params() - trainable)


@functools.lru_cache(maxsize=None)
def built(name, num_classes=100, input_shape=(32, 32, 3)):
    """Builds each configuration once per test session (WRN-28-10 takes ~1 s)."""
    return nets.build(name, num_classes, input_shape)


# --- Hand counts -------------------------------------------------------------------

def resnet32_count(num_classes, shortcut="A"):
    parts = [conv(3, 3, 16), bn(16)]
    cin = 16
    for filters in (16, 32, 64):
        for _ in range(5):
            parts += [conv(3, cin, filters), bn(filters), conv(3, filters, filters), bn(filters)]
            if cin != filters and shortcut == "B":
                parts += [conv(1, cin, filters), bn(filters)]
            cin = filters
    parts.append(dense(64, num_classes))
    return total(*parts)


def mobilenet_count(num_classes):
    parts = [conv(3, 3, 32), bn(32)]
    cin = 32
    for cout in (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024):
        parts += [(9 * cin, 0), bn(cin), conv(1, cin, cout), bn(cout)]  # depthwise, pointwise
        cin = cout
    parts.append(dense(1024, num_classes))
    return total(*parts)


# Szegedy et al. 2015, Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
GOOGLENET_TABLE = [
    (64, 96, 128, 16, 32, 32),      # 3a
    (128, 128, 192, 32, 96, 64),    # 3b
    (192, 96, 208, 16, 48, 64),     # 4a
    (160, 112, 224, 24, 64, 64),    # 4b
    (128, 128, 256, 24, 64, 64),    # 4c
    (112, 144, 288, 32, 64, 64),    # 4d
    (256, 160, 320, 32, 128, 128),  # 4e
    (256, 160, 320, 32, 128, 128),  # 5a
    (384, 192, 384, 48, 128, 128),  # 5b
]


def inception_v1_count(num_classes, k=5):
    def conv_bn(kernel, cin, cout):
        return total(conv(kernel, cin, cout), bn(cout, scale=False))

    parts = [conv_bn(7, 3, 64), conv_bn(1, 64, 64), conv_bn(3, 64, 192)]
    cin = 192
    for b0, b1r, b1, b2r, b2, b3 in GOOGLENET_TABLE:
        parts += [conv_bn(1, cin, b0), conv_bn(1, cin, b1r), conv_bn(3, b1r, b1),
                  conv_bn(1, cin, b2r), conv_bn(k, b2r, b2), conv_bn(1, cin, b3)]
        cin = b0 + b1 + b2 + b3
    assert cin == 1024
    parts.append(dense(1024, num_classes))
    return total(*parts)


def wrn28_10_count(num_classes):
    parts = [conv(3, 3, 16)]
    cin = 16
    for filters in (160, 320, 640):
        for _ in range(4):
            parts += [bn(cin), conv(3, cin, filters), bn(filters), conv(3, filters, filters)]
            if cin != filters:
                parts.append(conv(1, cin, filters))
            cin = filters
    parts += [bn(640), dense(640, num_classes)]
    return total(*parts)


# --- Parameter counts --------------------------------------------------------------

def test_resnet32_count_matches_paper_and_hand_count():
    model = built("resnet32")
    assert measured(model) == resnet32_count(100) == (470_004, 2_272)
    assert 450_000 <= model.count_params() <= 550_000  # Table 1: 0.5M


def test_resnet32_projection_shortcut_count():
    model = nets.build("resnet32", 100, shortcut="B")
    assert measured(model) == resnet32_count(100, shortcut="B")


def test_mobilenet_count_matches_paper_and_hand_count():
    model = built("mobilenet")
    assert model.count_params() == 3_331_364  # 3,228,864 base + 102,500 dense; Table 1: 3.3M
    assert measured(model) == mobilenet_count(100)


def test_mobilenet_224_reuses_keras_applications():
    model = built("mobilenet", 751, (224, 224, 3))
    assert measured(model) == mobilenet_count(751)
    reference = keras.applications.MobileNet(input_shape=(224, 224, 3), include_top=False,
                                             weights=None)
    assert {layer.name for layer in reference.layers[1:]} <= {layer.name for layer in model.layers}
    assert model.get_layer("conv_pw_13").output.shape == (None, 7, 7, 1024)
    logits = model(np.zeros((2, 224, 224, 3), np.float32), training=False)
    assert logits.shape == (2, 751)


def test_inception_v1_count_matches_googlenet_table():
    assert measured(built("inception_v1")) == inception_v1_count(100)
    assert built("inception_v1").count_params() == 6_090_612  # Table 1 says 7.8M; see module doc


def test_inception_v1_224_standard_stem_and_slim_branch():
    model = nets.build("inception_v1", 100, (224, 224, 3), branch2_kernel=3)
    assert measured(model) == inception_v1_count(100, k=3)
    assert model.get_layer("features").input.shape[1:3] == (7, 7)
    assert model.get_layer("Conv2d_1a_7x7").strides == (2, 2)


def test_wrn28_10_count_matches_hand_count():
    model = built("wrn28_10")
    assert measured(model) == wrn28_10_count(100)
    assert measured(model)[0] == 36_536_884  # Table 1: 36.5M


# --- Shapes and the "features" layer ----------------------------------------------

@pytest.mark.parametrize("name", nets.NAMES)
def test_logits_and_features(name):
    model = built(name)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    logits = model(images, training=False)
    assert logits.shape == (2, 100)
    assert np.all(np.isfinite(logits))
    features = model.get_layer("features")
    assert isinstance(features, keras.layers.GlobalAveragePooling2D)
    assert len(features.output.shape) == 2
    embed = keras.Model(model.input, features.output)
    assert embed(images).shape == (2, features.output.shape[-1])


@pytest.mark.parametrize("name,side", [("resnet32", 8), ("mobilenet", 4),
                                       ("inception_v1", 4), ("wrn28_10", 8)])
def test_small_input_resolution_before_pooling(name, side):
    assert built(name).get_layer("features").input.shape[1:3] == (side, side)


def test_tiny_is_tiny_and_takes_any_input_size():
    model = nets.build("tiny", 5, (8, 12, 1))
    assert model(np.zeros((2, 8, 12, 1), np.float32)).shape == (2, 5)
    assert measured(built("tiny")) == total(conv(3, 3, 8), bn(8), conv(3, 8, 16, bias=True),
                                            dense(16, 100))


# --- Registry and options ---------------------------------------------------------

def test_names():
    assert set(nets.NAMES) >= {"resnet32", "mobilenet", "inception_v1", "wrn28_10", "tiny"}


def test_unknown_name_raises():
    with pytest.raises(UserError, match="resnet32"):
        nets.build("resnet33", 10)


def test_model_name_defaults_to_network_and_can_be_set():
    assert nets.build("tiny", 10).name == "tiny"
    assert nets.build("tiny", 10, name="peer1").name == "peer1"


def test_unknown_option_raises_and_none_is_ignored():
    with pytest.raises(UserError, match="dropout"):
        nets.build("resnet32", 10, dropout=0.5)
    with pytest.raises(UserError, match="weights"):
        nets.build("tiny", 10, weights="imagenet")
    assert nets.build("tiny", 10, weights=None, dropout=None).count_params() > 0


@pytest.mark.parametrize("num_classes,input_shape", [
    (0, (32, 32, 3)), (True, (32, 32, 3)), (10, (32, 32)), (10, (4, 4, 3)), (10, (32, 32.0, 3)),
])
def test_bad_classes_or_shape_raise(num_classes, input_shape):
    with pytest.raises(UserError):
        nets.build("tiny", num_classes, input_shape)


def test_mobilenet_weights_need_large_input():
    with pytest.raises(UserError, match="128"):
        nets.build("mobilenet", 100, weights="imagenet")
    with pytest.raises(UserError, match="does not exist"):
        nets.build("mobilenet", 751, (224, 224, 3), weights="/no/such/file.h5")


def test_wrn_dropout_option():
    model = nets.wide_resnet.wide_resnet(10, (16, 16, 3), depth=10, width=1, dropout=0.3)
    rates = [l.rate for l in model.layers if isinstance(l, keras.layers.Dropout)]
    assert rates == [0.3] * 3


def test_option_a_shortcut_survives_keras_save(tmp_path):
    model = nets.resnet_cifar.resnet_cifar(10, (32, 32, 3), depth=8)
    path = str(tmp_path / "resnet8.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(images), model(images), rtol=1e-5, atol=1e-5)


def test_failed_weights_download_is_one_sentence_and_other_errors_pass_through():
    def offline(**kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None")

    with pytest.raises(UserError, match=r"ImageNet MobileNet weights.*weights=<path to x\.h5>"):
        nets.mobilenet.keras_application(offline, "MobileNet", "x.h5", weights="imagenet")

    def broken(**kwargs):
        raise ValueError("input_shape must be (224, 224, 3)")

    with pytest.raises(ValueError, match="input_shape"):
        nets.mobilenet.keras_application(broken, "MobileNet", "x.h5", weights="imagenet")
