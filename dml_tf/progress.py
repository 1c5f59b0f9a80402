"""An epoch's progress on the researcher's screen or in a log file, showing the epoch's means.

On a terminal it is Keras' Progbar, given the running means as stateful metrics (Progbar
would otherwise average what it is given once more, and train_lib used to give it the last
batch's values). Elsewhere (a pipe, a file) it writes plain lines without carriage returns,
backspaces or escape codes: one at the end of the epoch and, for epochs of
`LONG_EPOCH_STEPS` steps or more, one at every tenth of it.

Imports no TensorFlow; Keras only when a terminal gets a Progbar.
"""

import contextlib
import math
import sys
import time

# Epochs of at least this many steps also get a line at every tenth when not on a terminal.
LONG_EPOCH_STEPS = 100
_PARTS = 10


class EpochProgress:
    """Progress of one epoch of a cohort.

    Args:
      epoch: the epoch's index from 0, as Keras' callbacks count (shown from 1).
      epochs: how many epochs the run has.
      steps: the epoch's steps.
      num_peers: K, the cohort's size.
      batch_size: images per step (for images/s).
      first_step: steps already done when the display starts (a run resumed mid-epoch).
      stream: where to write (default sys.stdout at construction).
      every: when not on a terminal, a line every this many steps besides the final one;
        default: every tenth of the epoch for epochs of `LONG_EPOCH_STEPS` steps or more,
        none for shorter ones.
    """

    def __init__(self, epoch, epochs, steps, num_peers, batch_size, *, first_step=0,
                 stream=None, every=None):
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.num_peers, self.batch_size, self.first_step = num_peers, batch_size, first_step
        self.stream = stream or sys.stdout
        if every is None and steps >= LONG_EPOCH_STEPS:
            every = math.ceil(steps / _PARTS)
        self.every = every
        self._last_line_step = first_step
        self._progbar = self._make_progbar() if _is_terminal(self.stream) else None
        self._started = time.monotonic()  # after Keras' import, which is not the epoch's time

    def _make_progbar(self):
        from keras.utils import Progbar  # noqa: PLC0415 (Keras imports TensorFlow)

        self._write(f"Epoch {self.epoch + 1}/{self.epochs}\n")
        names = [name for name, _ in self._peer_values({})]
        with contextlib.redirect_stdout(self.stream):  # Progbar writes to sys.stdout
            progbar = Progbar(self.steps, stateful_metrics=names)
            if self.first_step:
                progbar.update(self.first_step)
        return progbar

    def update(self, step, means):
        """Shows step `step` (from 1) done, with `means` the epoch's running means so far
        (keys `peer{k}/loss`, `peer{k}/top1`, ...: the cohort's step metrics)."""
        if self._progbar is not None:
            with contextlib.redirect_stdout(self.stream):
                # Only `finish` ends the line (Progbar would at the last step on its own).
                self._progbar.update(step, self._peer_values(means), finalize=False)
        elif self.every and step < self.steps and step - self._last_line_step >= self.every:
            self._last_line_step = step
            self._write(self._line(step, means))

    def finish(self, means, test_metrics=None):
        """Leaves the epoch's final line: each peer's mean loss and accuracy over the epoch
        (`means`), images/s and the epoch's seconds; `test_metrics` (name -> value), when
        given, on an indented line below it."""
        if self._progbar is not None:
            with contextlib.redirect_stdout(self.stream):
                self._progbar.update(self.steps, self._peer_values(means), finalize=True)
        else:
            self._write(self._line(self.steps, means))
        if test_metrics:
            self._write("  " + "  ".join(f"{k}={v:.4f}" for k, v in test_metrics.items()) + "\n")

    def _peer_values(self, means):
        """(name, value) pairs of each peer's loss (its whole objective) and top-1 accuracy.
        Keras' Progbar shows these beside its own time per step (it would print images/s
        with four decimals)."""
        values = []
        for k in range(1, self.num_peers + 1):
            values.append((f"p{k}_loss", means.get(f"peer{k}/loss", math.nan)))
            values.append((f"p{k}_acc", means.get(f"peer{k}/top1", math.nan)))
        return values

    def _values(self, means, step, seconds):
        """The plain line's pairs: `_peer_values`, then images/s."""
        values = self._peer_values(means)
        images = (step - self.first_step) * self.batch_size
        values.append(("img/s", images / seconds if seconds > 0 else 0.0))
        return values

    def _seconds(self):
        return time.monotonic() - self._started

    def _line(self, step, means):
        seconds = self._seconds()
        parts = [f"Epoch {self.epoch + 1}/{self.epochs} step {step}/{self.steps}",
                 f"{seconds:.1f}s"]
        for name, value in self._values(means, step, seconds):
            parts.append(f"{value:.0f} img/s" if name == "img/s" else f"{name}: {value:.4f}")
        return " - ".join(parts) + "\n"

    def _write(self, text):
        self.stream.write(text)
        self.stream.flush()


def _is_terminal(stream):
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
