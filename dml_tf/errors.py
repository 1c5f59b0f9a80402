"""The one exception type for mistakes a user can fix (bad flag, missing or malformed data)."""

import importlib.util


class UserError(ValueError):
    """A problem the user can fix; its message is one sentence naming the flag or file.

    Run scripts catch it, print the message without a traceback and exit with status 2.
    """


class MissingExtraError(UserError, ImportError):
    """An optional dependency of a module is not installed: an ImportError for Python, one
    sentence for the run scripts."""


def missing_extra(module, extra, requirements):
    """The MissingExtraError naming `extra`, or None when every requirement is installed.

    Args:
      module: the module that needs the extra, e.g. "dml_tf.analysis".
      extra: the extra's name in pyproject.toml, e.g. "analysis".
      requirements: (import name, package name) pairs, e.g. (("sklearn", "scikit-learn"),).
    """
    for name, package in requirements:
        try:
            found = importlib.util.find_spec(name) is not None
        except ValueError:  # in sys.modules as None: deliberately hidden
            found = False
        if not found:
            return MissingExtraError(f"{module} needs the {extra} extra ({package} is not "
                                     f'installed): pip install "dml_tf[{extra}]"')
    return None
