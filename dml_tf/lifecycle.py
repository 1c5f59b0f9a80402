"""What happens around a method's steps, the same for the run scripts and `MutualLearning.fit`.

A method declares its needs on `dml_tf.methods.base.Method` (a fixed teacher, held-out data,
a per-epoch hook, summaries). `MethodLifecycle` is the one object that drives them, and
closes every epoch with the checks both training paths share (collapse detection, the
method's summaries): `train_lib`'s loop calls it directly, `MutualLearning.fit` through a
Keras callback. Each path only says how it gets a teacher's weights and held-out
predictions (a checkpoint and the task's pipeline; a Keras model and the user's arrays) and
how it words a remedy (flags; Python arguments).
"""

import sys

from dml_tf import collapse
from dml_tf.errors import UserError


def check_inputs(method, *, teacher, held_out, teacher_hint, held_out_hint):
    """Refuses, in one sentence each, a method whose declared needs are not given.

    Args:
      method: a dml_tf.methods.base.Method.
      teacher: whether a teacher was given (for `needs_teacher`).
      held_out: whether held-out data was given (for `needs_validation`).
      teacher_hint, held_out_hint: how the user gives them on this path.
    """
    if method.needs_teacher and not teacher:
        raise UserError(f"method {method.name!r} distils from a fixed, trained teacher (peer "
                        f"{', '.join(str(k + 1) for k in method.frozen_peers)}), which was not "
                        f"given: {teacher_hint}.")
    if method.needs_validation and not held_out:
        raise UserError(f"method {method.name!r} re-estimates its ensemble weights on held-out "
                        f"data before every epoch, which was not given: {held_out_hint}.")


class MethodLifecycle:
    """Drives a method's declared hooks for one cohort of peers.

    Args:
      method: the dml_tf.methods.base.Method being trained.
      models: the K peer models (the frozen ones receive the teacher).
      num_classes: M, for the collapse rule.
      on_collapse: "warn" or "stop" (see dml_tf.collapse).
      collapse_fix: the remedy the collapse warning suggests, in the path's own words.
    """

    def __init__(self, method, models, num_classes, *, on_collapse="warn", collapse_fix=""):
        if on_collapse not in collapse.ON_COLLAPSE:
            raise UserError(f"on_collapse={on_collapse!r} is not one of "
                            f"{', '.join(map(repr, collapse.ON_COLLAPSE))}.")
        self.method = method
        self.models = list(models)
        self.num_classes = num_classes
        self.on_collapse = on_collapse
        self.collapse_fix = collapse_fix

    def load_teacher(self, restore):
        """Puts the teacher into the frozen peers: `restore(model, index)` for each one
        (index from 0), only for methods with `needs_teacher`."""
        if not self.method.needs_teacher:
            return
        for index in self.method.frozen_peers:
            restore(self.models[index], index)

    def begin_epoch(self, held_out_probabilities):
        """The per-epoch hook: `held_out_probabilities()` -> (K [N, M] arrays, [N] labels) is
        called only for methods with `needs_validation`."""
        if self.method.needs_validation:
            self.method.update_weights(*held_out_probabilities())

    def end_epoch(self, epoch, means, steps_done, prefix=""):
        """The epoch's shared logs and checks: collapse detection and the method's summaries.

        Args:
          epoch: the epoch's index from 0.
          means: the epoch's means of the step metrics, keys f"{prefix}peer{k}/..." .
          steps_done: the cohort's updates so far (its step counter).
          prefix: the keys' prefix ("train/" in the run scripts' logs).

        Returns:
          (logs, stop): logs to add (f"{prefix}collapsed" and the method's summaries); stop
          is the collapse warning's text when on_collapse="stop" asks to end training, else
          None (a warning was printed instead, if any).
        """
        found = collapse.collapsed_peers(means, self.num_classes, len(self.models), steps_done,
                                         prefix=prefix)
        logs = {f"{prefix}collapsed": float(bool(found)), **self.method.summaries()}
        if not found:
            return logs, None
        message = collapse.describe(found, self.num_classes, epoch + 1, steps_done,
                                    self.collapse_fix, mutual=self.method.mutual)
        if self.on_collapse == "stop":
            return logs, message
        print(f"warning: {message}", file=sys.stderr, flush=True)
        return logs, None
