"""Registry of training methods (METHODS.md). Adding one = one file + one line here."""

import inspect

from dml_tf.errors import UserError
from dml_tf.methods import dml, dml_e, dml_js, independent
from dml_tf.methods import dml_l2, entropy_reg, kd
from dml_tf.methods import kdcl

_REGISTRY = {
    "independent": independent.Independent,
    "dml": dml.DML,
    "dml_js": dml_js.DMLJensenShannon,
    "dml_e": dml_e.DMLEnsemble,
    "kd": kd.Distillation,
    "entropy_reg": entropy_reg.EntropyRegularised,
    "dml_l2": dml_l2.DMLFeatureL2,
    "kdcl_naive": kdcl.KDCLNaive,
    "kdcl_linear": kdcl.KDCLLinear,
    "kdcl_minlogit": kdcl.KDCLMinLogit,
    "kdcl_general": kdcl.KDCLGeneral,
}

NAMES = tuple(_REGISTRY)


def get(name, **hparams):
    """Returns the method `name` built with `hparams` (e.g. label_smoothing=0.1).

    Raises:
      UserError: unknown method or hyperparameter.
    """
    if name not in _REGISTRY:
        raise UserError(f"--method={name} is not a method; choose one of {', '.join(NAMES)}.")
    cls = _REGISTRY[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(hparams) - accepted)
    if unknown:
        raise UserError(
            f"--method_args names {', '.join(unknown)}, which --method={name} does not take; "
            f"it takes {', '.join(sorted(accepted)) or 'none'}.")
    return cls(**hparams)
