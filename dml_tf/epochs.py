"""The epoch bookkeeping of the run scripts' loop: its length, its means, its stop requests.

Imports no TensorFlow: plain Python state that train_lib checkpoints (the means as JSON) and
reads at every step.
"""

import json
import math
import signal
import threading

from dml_tf.errors import UserError


class Schedule:
    """Steps per epoch and epochs of a run (a --train_steps budget cuts the last epoch short)."""

    def __init__(self, config, num_train):
        steps = num_train // config.batch_size
        if steps == 0:
            raise UserError(f"--batch_size={config.batch_size} is larger than the training set "
                            f"({num_train} images); lower it.")
        self.steps_per_epoch = min(steps, config.steps_per_epoch or steps)
        self.train_steps = config.train_steps
        self.epochs = config.epochs
        if config.train_steps:
            self.epochs = math.ceil(config.train_steps / self.steps_per_epoch)

    def steps(self, epoch):
        if self.train_steps:
            return min(self.steps_per_epoch, self.train_steps - epoch * self.steps_per_epoch)
        return self.steps_per_epoch


class EpochMeans:
    """Running means of an epoch's step metrics (cohort.Cohort's vocabulary).

    Every step of the run scripts has the same batch size (drop_remainder), so these step
    means equal the batch-weighted means `MutualLearning.fit` logs. A non-finite value (a
    step --on_nan=skip dropped) is left out of its metric's mean and counted apart.
    """

    def __init__(self, state=None):
        state = json.loads(state) if state else {}
        self.sums = state.get("sums", {})
        self.steps = state.get("steps", 0)
        # Checkpoints before per-metric counts divided every metric by all the steps.
        self.counts = state.get("counts", {key: self.steps for key in self.sums})
        self.skipped = state.get("skipped", {})

    def add(self, step_metrics):
        self.steps += 1
        for key, value in step_metrics.items():
            if math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1
            elif key.endswith("/loss"):
                self.skipped[key] = self.skipped.get(key, 0) + 1

    def means(self):
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def train_metrics(self):
        """The means as `train/...` tags, with `train/peer{k}/skipped_steps` where any."""
        return {f"train/{k}": v for k, v in self.means().items()} | {
            f"train/{k.replace('/loss', '/skipped_steps')}": float(n) for k, n in self.skipped.items()}

    def state(self):
        return json.dumps({"sums": self.sums, "counts": self.counts, "skipped": self.skipped,
                           "steps": self.steps})


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of the exact position was written."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


class StopRequests:
    """Turns SIGINT/SIGTERM into a request the loop honours at the next step boundary."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame):
        self.signum = signum

    def interrupted(self, where, checkpoint_dir):
        """The Interrupted to raise once the position is saved in checkpoint_dir."""
        name = signal.Signals(self.signum).name
        return Interrupted(self.signum, f"{name}: {where}; a checkpoint of this position is in "
                                        f"{checkpoint_dir}: run the same command to resume.")

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
