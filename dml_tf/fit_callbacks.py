"""The Keras callbacks `MutualLearning.fit` adds: the method lifecycle and checks, and a
progress bar that shows what a user reads.

`CohortChecks` is `fit`'s side of `dml_tf.lifecycle.MethodLifecycle` (the run scripts' loop
calls the same object directly): the per-epoch hook before each epoch, collapse detection
and the method's summaries after it, and the non-finite checks of `on_nan`.
"""

import math
import re
import sys

import keras

from dml_tf.errors import UserError

# What the progress bar shows: each peer's loss and top1 and the ensemble's top1 (with
# Keras' `val_` prefix in fit's validation); the history and other callbacks get every log.
_SHOWN = re.compile(r"(val_)?(peer\d+/(loss|top1)|ensemble/top1)")


class CohortChecks(keras.callbacks.Callback):
    """The lifecycle of `model.method` and the checks of `model.on_nan`, around fit's epochs."""

    def __init__(self, model):
        super().__init__()
        self.mutual_learning = model

    def on_epoch_begin(self, epoch, logs=None):
        self.mutual_learning.lifecycle.begin_epoch(self.mutual_learning.held_out_probabilities)

    def on_train_batch_end(self, batch, logs=None):
        model = self.mutual_learning
        if model.on_nan != "stop" or not logs:
            return
        for k in range(1, model.num_peers + 1):
            value = logs.get(f"peer{k}/loss", 0.0)
            if not math.isfinite(value):
                raise UserError(
                    f"Peer {k}'s loss became {value} by step {model.cohort.steps_done}; fit "
                    "stopped: look for NaN/Inf among the inputs, or lower the learning rate "
                    "(on_nan='skip' drops such updates).")

    def on_epoch_end(self, epoch, logs=None):
        model = self.mutual_learning
        logs = logs if logs is not None else {}
        broken = model.cohort.nonfinite_peers()
        if broken:
            which = f"peer{'s' if len(broken) > 1 else ''} {', '.join(map(str, broken))}"
            raise UserError(
                f"The weights of {which} became NaN or Inf during epoch {epoch + 1} though the "
                "losses stayed finite (a NaN/Inf among the inputs, or a learning rate too "
                "high); fit stopped: clean the inputs or lower the learning rate and rebuild the "
                "peers, or pass on_nan='skip' to drop such updates.")
        shared, stop = model.lifecycle.end_epoch(epoch, logs, model.cohort.steps_done)
        logs.update(shared)
        if stop:
            print(f"warning: {stop}", file=sys.stderr, flush=True)
            self.model.stop_training = True


class CohortProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, given only the logs `_SHOWN` names."""

    def __init__(self, num_peers):
        super().__init__()
        self.num_peers = num_peers

    @staticmethod
    def _shown(logs):
        return {k: v for k, v in (logs or {}).items() if _SHOWN.fullmatch(k)}

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, self._shown(logs))

    def on_test_batch_end(self, batch, logs=None):
        super().on_test_batch_end(batch, self._shown(logs))

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, self._shown(logs))

    def on_test_end(self, logs=None):
        super().on_test_end(self._shown(logs))
