"""Network registry: `build(name, num_classes, input_shape, **kw)` -> images-to-logits model.

Every network is a functional keras.Model from float32 images (already normalised by
the data pipeline) to logits, with its last pooling layer named "features" so that
``keras.Model(m.inputs, m.get_layer("features").output)`` gives the embedding used for
re-identification, and its classifier a float32 Dense layer named "logits". Adding a
network = one file with a builder ``fn(num_classes, input_shape, *, name=..., **options)``
+ one line in `_BUILDERS`.
"""

import collections.abc
import importlib
import importlib.util
import inspect
import pkgutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dml_tf.errors import UserError

if TYPE_CHECKING:  # Keras only for type checkers: the registry imports it when building
    import keras


class _Builders(collections.abc.Mapping):
    """name -> builder, each imported from its "module:function" on first use.

    The table of strings is the registry: `NAMES` (and the flags listing them) need no
    TensorFlow; a network's module, which imports Keras, loads when the network is built.
    """

    def __init__(self, table):
        self._table = dict(table)

    def __getitem__(self, name):
        return pkgutil.resolve_name(self._table[name])

    def __iter__(self):
        return iter(self._table)

    def __len__(self):
        return len(self._table)


_BUILDERS = _Builders({
    "resnet32": "dml_tf.nets.resnet_cifar:resnet32",
    "mobilenet": "dml_tf.nets.mobilenet:mobilenet",
    "inception_v1": "dml_tf.nets.inception_v1:inception_v1",
    "wrn28_10": "dml_tf.nets.wide_resnet:wrn28_10",
    "tiny": "dml_tf.nets.tiny:tiny",
    "resnet18": "dml_tf.nets.resnet_imagenet:resnet18",
    "resnet50": "dml_tf.nets.resnet_imagenet:resnet50",
    "mobilenet_v2": "dml_tf.nets.mobilenet_v2:mobilenet_v2",
    "mobilenet_v2_050": "dml_tf.nets.mobilenet_v2:mobilenet_v2_050",
})
NAMES = tuple(_BUILDERS)
_MIN_SIDE = 8


def options(name: str) -> tuple[str, ...]:
    """Returns the keyword options (besides `name`) that network `name` accepts."""
    params = inspect.signature(_builder(name)).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "name")


def _builder(name):
    if name not in _BUILDERS:
        raise UserError(f"name={name!r} is not a network; choose one of: {', '.join(NAMES)}.")
    return _BUILDERS[name]


def build(name: str, /, num_classes: int, input_shape: Sequence[int] = (32, 32, 3),
          **kw: Any) -> "keras.Model":
    """Builds network `name` for `num_classes` classes.

    Args:
        name: one of `NAMES`.
        num_classes: number of logits, >= 1.
        input_shape: (height, width, channels) of the images; both sides >= 8.
        **kw: network options, e.g. ``name="peer1"`` (the Keras model name, default
            the network name, so two peers of one architecture can be told apart),
            ``dropout`` or ``weights`` where the network has them (see `options`).
            An option set to None means "the network's default" and is dropped for
            networks without it, so a caller may pass e.g. ``weights=None`` to all.

    Returns:
        A keras.Model mapping float32 images [batch, *input_shape] to logits
        [batch, num_classes] (no softmax). Its layers follow Keras' global dtype
        policy (`dml_tf.precision`) except the "logits" layer, always float32 (Keras'
        advice for the last layer under mixed precision); its BatchNormalization layers
        compute with TensorFlow's fused kernel (`fused_batch_norm`).

    Raises:
        UserError: for an unknown network or option, a bad class count or input shape.
    """
    builder = _builder(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}.")
    shape = tuple(input_shape)
    if (len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape)
            or min(shape[:2]) < _MIN_SIDE):
        raise UserError(
            f"input_shape must be (height, width, channels) with sides >= {_MIN_SIDE}, "
            f"got {input_shape!r}.")
    accepted = options(name)
    for key in list(kw):
        if key == "name" or key in accepted:
            continue
        if kw[key] is None:
            del kw[key]
        else:
            raise UserError(
                f"Network {name!r} has no option {key!r}; it accepts: "
                f"{', '.join(accepted + ('name',))}.")
    model_name = kw.pop("name", None) or name
    if not isinstance(model_name, str) or "/" in model_name:
        raise UserError(f"Model name must be a string without '/', got {model_name!r}.")
    from dml_tf.nets import fused_batch_norm  # noqa: PLC0415 (imports Keras: only when building)

    # TensorFlow's fused BatchNormalization kernel: the same numbers, faster steps.
    return fused_batch_norm.fuse(builder(num_classes, shape, name=model_name, **kw))


def __getattr__(name):
    """`nets.mobilenet` and the like: a network's module, imported on first use."""
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
