"""dml_tf: Deep Mutual Learning (Zhang et al., CVPR 2018) in TensorFlow 2 / Keras 3.

Public API (docs/api.md has every signature with an example):

* `MutualLearning`: a keras.Model training K peers with `compile`/`fit`.
* `quiet()`: import TensorFlow without its start-up lines (call it first); setting
  ``DML_TF_QUIET=1`` does the same for the TensorFlow import dml_tf makes.
* Modules: `methods` (`get`, `NAMES`), `nets` (`build`, `NAMES`), `losses`, `cohort`
  (`Cohort`), `export` (`export_cohort`), `data` (loaders, `augment`), `evaluation`,
  `analysis` (needs ``pip install "dml_tf[analysis]"``).

`import dml_tf` does not import TensorFlow: each name above is imported on first use.
"""

import importlib
import os
import sys
from typing import TYPE_CHECKING

from dml_tf.quiet_start import quiet

__version__ = "0.1.0"

_MODULES = ("analysis", "cohort", "data", "evaluation", "export", "losses", "methods", "nets")
__all__ = ["MutualLearning", "quiet", *_MODULES]
# The names whose import imports TensorFlow (the registries and data loaders wait for use).
_IMPORT_TENSORFLOW = ("MutualLearning", "analysis", "cohort", "export", "losses")

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports on use
    from dml_tf import analysis, cohort, data, evaluation, export, losses, methods, nets  # noqa: F401
    from dml_tf.mutual_learning import MutualLearning  # noqa: F401

# Read once, at `import dml_tf`, so that it applies to dml_tf's own TensorFlow import.
_QUIET = os.environ.get("DML_TF_QUIET", "").strip().lower() in ("1", "true", "yes")


def __getattr__(name):
    # Lazy (PEP 562): `import dml_tf` and `dml_tf.config` must not start TensorFlow, so that
    # the run scripts check their flags in a second.
    if name not in __all__:
        raise AttributeError(f"module 'dml_tf' has no attribute {name!r}")
    if _QUIET and name in _IMPORT_TENSORFLOW and "tensorflow" not in sys.modules:
        quiet()
    if name == "MutualLearning":
        from dml_tf.mutual_learning import MutualLearning
        return MutualLearning
    return importlib.import_module(f"{__name__}.{name}")


def __dir__():
    # The public API, imported or not yet, for dir(), help() and tab completion.
    return sorted(["__version__", *__all__])
