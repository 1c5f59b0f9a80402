"""Registry of training methods (docs/methods.md). Adding one = one file + one line here.

The registry is a table of names to "module:class"; a method's module (and with it
TensorFlow) is imported only when the method is asked for, so `NAMES` is free to read
before TensorFlow starts.
"""

import importlib
import importlib.util
import inspect
import pkgutil
from typing import TYPE_CHECKING, Any

from dml_tf.errors import UserError

if TYPE_CHECKING:  # TensorFlow only for type checkers: a method's module imports it when asked for
    from dml_tf.methods.base import Method

_REGISTRY = {
    "independent": "dml_tf.methods.independent:Independent",
    "dml": "dml_tf.methods.dml:DML",
    "dml_js": "dml_tf.methods.dml_js:DMLJensenShannon",
    "dml_e": "dml_tf.methods.dml_e:DMLEnsemble",
    "kd": "dml_tf.methods.kd:Distillation",
    "entropy_reg": "dml_tf.methods.entropy_reg:EntropyRegularised",
    "dml_l2": "dml_tf.methods.dml_l2:DMLFeatureL2",
    "kdcl_naive": "dml_tf.methods.kdcl:KDCLNaive",
    "kdcl_linear": "dml_tf.methods.kdcl:KDCLLinear",
    "kdcl_minlogit": "dml_tf.methods.kdcl:KDCLMinLogit",
    "kdcl_general": "dml_tf.methods.kdcl:KDCLGeneral",
}

NAMES = tuple(_REGISTRY)


def method_class(name: str) -> "type[Method]":
    """Returns the class of method `name`, importing its module.

    Raises:
      UserError: unknown method.
    """
    if name not in _REGISTRY:
        raise UserError(f"method={name!r} is not a method; choose one of {', '.join(NAMES)}.")
    return pkgutil.resolve_name(_REGISTRY[name])


def hyperparameters(name: str) -> dict[str, Any]:
    """Returns {hyperparameter: default} of method `name` (the keyword arguments `get` takes)."""
    params = inspect.signature(method_class(name).__init__).parameters.values()
    return {p.name: p.default for p in params if p.name != "self"}


def get(name: str, **hparams: Any) -> "Method":
    """Returns the method `name` built with `hparams` (e.g. label_smoothing=0.1).

    Raises:
      UserError: unknown method or hyperparameter.
    """
    accepted = hyperparameters(name)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise UserError(
            f"hparams include {', '.join(unknown)}, which method={name!r} does not take; "
            f"it takes {', '.join(sorted(accepted)) or 'none'}.")
    return method_class(name)(**hparams)


def __getattr__(name):
    """`methods.dml` and the like: a method's module, imported on first use."""
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
