"""`MutualLearning`: Deep Mutual Learning as a Keras model, trained with compile/fit.

    model = dml_tf.MutualLearning([net_a, net_b], method="dml")
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.fit(images, labels, validation_data=(test_images, test_labels), epochs=10)

The update that `fit` runs is `Cohort.step`, the cohort's own sequential or simultaneous
step body, inside Keras' compiled train function; what happens around it (a kd teacher,
kdcl_general's per-epoch weights, collapse detection) is `dml_tf.lifecycle`'s, as in the run
scripts: one implementation of each, and every method behaves in `fit` as in the run scripts.
"""

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dml_tf import cohort as cohort_lib
from dml_tf import lifecycle, methods, peer_checks
from dml_tf.errors import UserError
from dml_tf.evaluation import classification
from dml_tf.fit_callbacks import CohortChecks, CohortProgbar

# Carried by the label checks, so that their failure can become a UserError.
_LABEL_RANGE_MARK = "dml_tf: label outside the class range"
ON_NAN = ("stop", "skip")


class MutualLearning(keras.Model):
    """A cohort of K peers trained together, each on cross-entropy plus mimicry of the others.

    Logs, per peer k (epoch means weighted by batch size; the same names and meanings as the
    run scripts' `train/...` and `test/...` tags): `peer{k}/ce`, the method's other terms
    (e.g. `peer{k}/mimicry`), `peer{k}/weight_decay`, `peer{k}/loss` (the peer's whole
    objective: the method's terms plus weight decay), `peer{k}/top1` (accuracy) and, in
    training, `peer{k}/entropy` (the predictions' mean entropy) and `collapsed`; `loss` is
    the peers' mean loss, for Keras' defaults (EarlyStopping, ModelCheckpoint). Evaluation
    adds `ensemble/ce` and `ensemble/top1` of the mean of the peers' probabilities. The
    progress bar shows each peer's loss and top1 and the ensemble's top1; the history and
    callbacks get everything.

    Calling the model (`predict`) gives the ensemble's probabilities; `peer_logits` the
    peers' logits; `cohort` the underlying `dml_tf.cohort.Cohort` (for
    `dml_tf.export.export_cohort`). Keras' `optimizer` attribute is the first updated peer's
    optimizer (its iterations and learning rate are what Keras' callbacks log).
    """

    def __init__(self, peers: Sequence[keras.Model], method: "str | methods.base.Method" = "dml",
                 update: str = "sequential", weight_decay: float = 0.0, *,
                 teacher: "keras.Model | str | os.PathLike | None" = None,
                 held_out: tuple | None = None, semi_supervised: bool = False,
                 per_peer_views: bool = False, on_collapse: str = "warn", on_nan: str = "stop",
                 **method_args: Any) -> None:
        """Args:
          peers: list of K ≥ 1 built Keras models (functional, Sequential or subclassed)
            mapping the same inputs to logits (no final softmax), with no layer in common.
          method: a name of `dml_tf.methods.NAMES`, or a `dml_tf.methods.base.Method`.
          update: "sequential" (paper Algorithm 1) or "simultaneous".
          weight_decay: λ of λ/2·Σ‖W‖² over every peer's kernels.
          teacher: for methods with a fixed teacher (kd: peer 1): a trained keras.Model of
            that peer's architecture, or the path of its weights file (`.weights.h5`); its
            weights are copied into the peer, which is never updated.
          held_out: for methods that re-estimate on held-out data before every epoch
            (kdcl_general): `(inputs, labels)` kept out of training, e.g. the last tenth of
            the training set (the run scripts' --val_fraction).
          semi_supervised: labels of -1 mark unlabelled examples: no cross-entropy for them,
            mimicry on all (paper Sec. 3.4; the run scripts' --semi_supervised=dml_all).
          per_peer_views: each example's inputs are a tuple of K views, peer k trained on
            the k-th (e.g. its own augmentation, as KDCL does).
          on_collapse: after an epoch in which every peer still predicts near-uniform
            probabilities (dml_tf.collapse), "warn" (one line on stderr, `collapsed` = 1 in
            the epoch's logs) or "stop" (the same, and fit stops as EarlyStopping does).
          on_nan: a non-finite loss or weight: "stop" (fit raises UserError at that step,
            or after the epoch for a weight) or "skip" (such updates are dropped and the
            weights and optimizer state put back; this keeps a copy of them every step).
          **method_args: the method's hyperparameters (e.g. temperature=2), with a name.
        """
        peers = peer_checks.checked_peers(peers)
        method = _method(method, method_args)
        cohort_lib.check_arguments(len(peers), method, update)
        _check_method_inputs(method, teacher, held_out)
        if on_nan not in ON_NAN:
            raise UserError(f"on_nan={on_nan!r} is not one of {', '.join(map(repr, ON_NAN))}.")
        super().__init__(name="mutual_learning")
        self.peers = peers
        self.method = method
        self.update_order = update
        self.weight_decay = float(weight_decay)
        self.semi_supervised = bool(semi_supervised)
        self.per_peer_views = bool(per_peer_views)
        self.on_nan = on_nan
        self.num_classes = peer_checks.num_classes(peers)
        self.lifecycle = lifecycle.MethodLifecycle(
            method, peers, self.num_classes, on_collapse=on_collapse,
            collapse_fix="try dml_tf.schedules.LinearWarmup or a lower learning rate")
        self.lifecycle.load_teacher(lambda model, index: peer_checks.load_teacher(
            model, index, teacher))
        self._held_out = self._checked_held_out(held_out) if held_out is not None else None
        self._cohort = None
        self._trackers = {name: keras.metrics.Mean(name=name)
                          for name in _metric_names(method, len(peers), self.num_classes)}
        self.built = True

    @property
    def on_collapse(self):
        return self.lifecycle.on_collapse

    @property
    def num_peers(self):
        return len(self.peers)

    @property
    def cohort(self) -> cohort_lib.Cohort:
        """The `dml_tf.cohort.Cohort` of the peers and their optimizers (after `compile`)."""
        if self._cohort is None:
            raise UserError("MutualLearning has no cohort before compile(); call "
                            "compile(optimizer=...) first.")
        return self._cohort

    @property
    def metrics(self):
        return list(self._trackers.values())

    def compile(self, optimizer: Any = "rmsprop", *, run_eagerly: bool = False,
                steps_per_execution: int = 1, jit_compile: bool = False) -> None:
        """Args:
          optimizer: one optimizer (or its name), copied for every peer so that each has its
            own slots, or a list of K optimizers, one per peer. Under a mixed_float16 policy
            each is wrapped in keras.optimizers.LossScaleOptimizer (dynamic loss scaling).
          run_eagerly, steps_per_execution, jit_compile: as for `keras.Model.compile`
            (with jit_compile the labels are checked before the compiled step).
        """
        optimizers = [_with_loss_scaling(o, peer) for o, peer in
                      zip(self._peer_optimizers(optimizer), self.peers)]
        self._cohort = cohort_lib.Cohort(self.peers, optimizers, self.method, self.update_order,
                                         weight_decay=self.weight_decay,
                                         strategy=self.distribute_strategy,
                                         skip_nonfinite=self.on_nan == "skip")
        # Tracked by Keras: save_weights and BackupAndRestore then hold every peer's slots.
        self._optimizers = optimizers
        updated = [k for k in range(self.num_peers) if k not in self._cohort.frozen] or [0]
        super().compile(optimizer=optimizers[updated[0]], run_eagerly=run_eagerly,
                        steps_per_execution=steps_per_execution, jit_compile=jit_compile,
                        auto_scale_loss=False)

    def _peer_optimizers(self, optimizer):
        if isinstance(optimizer, (list, tuple)):
            optimizers = [keras.optimizers.get(o) for o in optimizer]
            if len(optimizers) != self.num_peers or len(set(map(id, optimizers))) != len(optimizers):
                raise UserError(f"optimizer must be one optimizer or a list of {self.num_peers} "
                                f"distinct ones (one per peer), got {len(optimizers)}.")
            return optimizers
        first = keras.optimizers.get(optimizer)
        # from_config gives each peer a fresh optimizer: its own slots and iteration count.
        return [first] + [type(first).from_config(first.get_config())
                          for _ in range(self.num_peers - 1)]

    def call(self, inputs, training=False):
        """The ensemble's probabilities: the mean of the peers' softmax outputs."""
        probs = [tf.nn.softmax(z) for z in self._logits(inputs, training)]
        return tf.add_n(probs) / float(len(probs))

    def peer_logits(self, inputs: Any) -> list[tf.Tensor]:
        """The K peers' logits (inference mode), a list of float32 [B, M] tensors."""
        return self._logits(inputs, False)

    def _logits(self, inputs, training):
        views = self._views(inputs)
        return [tf.cast(peer(x, training=training), tf.float32)
                for peer, x in zip(self.peers, views)]

    def _views(self, inputs):
        """Each peer's inputs, in the dtype it declares (an int64 id stays an int64 id)."""
        if self.per_peer_views:
            if not isinstance(inputs, (list, tuple)) or len(inputs) != self.num_peers:
                raise UserError(f"per_peer_views=True takes inputs as a tuple of "
                                f"{self.num_peers} views, one per peer.")
            return [peer_checks.as_peer_input(x, peer) for x, peer in zip(inputs, self.peers)]
        return [peer_checks.as_peer_input(inputs, peer) for peer in self.peers]

    def train_step(self, data):
        inputs, labels, label_mask = self._unpack(data)
        stats = self.cohort.step(self._views(inputs), labels, label_mask)
        return self._record(stats, tf.shape(labels)[0])

    def test_step(self, data):
        inputs, labels, _ = self._unpack(data)
        logits, all_losses = self.cohort.inference_losses(self._views(inputs), labels)
        values = {}
        for k, (logits_k, peer_losses) in enumerate(zip(logits, all_losses), start=1):
            values.update({f"peer{k}/{name}": v for name, v in peer_losses.items()})
            values[f"peer{k}/top1"] = _top1(logits_k, labels)
        probs = tf.add_n([tf.nn.softmax(z) for z in logits]) / float(len(logits))
        values["loss"] = tf.add_n([values[f"peer{k}/loss"] for k in
                                   range(1, self.num_peers + 1)]) / float(self.num_peers)
        # The run scripts' test metrics, per batch (evaluation.classification).
        values["ensemble/ce"] = tf.reduce_mean(
            classification.cross_entropy_per_example(probs, labels))
        values["ensemble/top1"] = _top1(probs, labels)
        return self._record(values, tf.shape(labels)[0])

    def _record(self, values, batch_size):
        """Updates the running means (weighted by the batch size) and returns them."""
        weight = tf.cast(batch_size, tf.float32)
        for name, value in values.items():
            self._trackers[name].update_state(value, sample_weight=weight)
        return {name: self._trackers[name].result() for name in values}

    def _unpack(self, data):
        """(inputs, checked int64 [B] labels, label mask or None) of one batch."""
        inputs, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if labels is None:
            raise UserError("MutualLearning needs labels; pass y to fit/evaluate, or a dataset "
                            "of (inputs, labels) pairs.")
        if sample_weight is not None:
            raise UserError("MutualLearning takes no sample weights: each peer's loss is the "
                            "method's; pass (inputs, labels) pairs only.")
        labels = self._labels(labels)
        if not self.semi_supervised:
            return inputs, labels, None
        # Unlabelled examples carry -1: no cross-entropy, mimicry only (as the run scripts).
        return inputs, tf.maximum(labels, 0), tf.cast(labels >= 0, tf.float32)

    def _labels(self, labels):
        labels = tf.convert_to_tensor(labels)
        shape = labels.shape
        peer_checks.check_label_layout(labels, self.num_classes)
        if shape.rank == 2:
            labels = tf.squeeze(labels, axis=-1)
        labels = tf.cast(labels, tf.int64)
        if self.jit_compile:
            return labels  # checked before the compiled step (`_checked_data`): XLA drops asserts
        low = -1 if self.semi_supervised else 0
        in_range = tf.reduce_all((labels >= low) & (labels < self.num_classes))
        with tf.control_dependencies([tf.debugging.Assert(in_range, [_LABEL_RANGE_MARK])]):
            return tf.identity(labels)

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            validation_split=0.0, validation_data=None, **kwargs):
        """keras.Model.fit, with the method's lifecycle and checks (see the class docstring);
        class_weight and sample_weight are refused."""
        for name in ("class_weight", "sample_weight"):
            if kwargs.get(name) is not None:
                raise UserError(f"MutualLearning.fit takes no {name}: each peer's loss is the "
                                "method's, unweighted; drop it (or resample the data).")
        x, y = self._checked_data(x, y)
        if self.jit_compile and isinstance(validation_data, (tuple, list)):
            validation_data = (*self._checked_data(*validation_data[:2]), *validation_data[2:])
        elif self.jit_compile and validation_data is not None:
            validation_data = self._checked_data(validation_data, None)[0]
        # First, so that the callbacks after it (TensorBoard, CSVLogger) see `collapsed` too.
        callbacks = [CohortChecks(self), *(callbacks or [])]
        if verbose != 0:
            callbacks.append(CohortProgbar(self.num_peers))
        with self._label_errors():
            return super().fit(x, y, batch_size=batch_size, epochs=epochs, verbose=verbose,
                               callbacks=callbacks, validation_split=validation_split,
                               validation_data=validation_data, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", callbacks=None,
                 **kwargs):
        """keras.Model.evaluate with the label checks and the short progress bar."""
        x, y = self._checked_data(x, y)
        # fit's own validation passes its CallbackList, which holds the progress bar already.
        if not isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = list(callbacks or [])
            if verbose != 0:
                callbacks.append(CohortProgbar(self.num_peers))
        with self._label_errors():
            return super().evaluate(x, y, batch_size=batch_size, verbose=verbose,
                                    callbacks=callbacks, **kwargs)

    def predict(self, x, *args, **kwargs):
        """keras.Model.predict (the ensemble's probabilities), a batch-less input refused first
        (inside `call`, Keras would wrap the sentence in its own message)."""
        if isinstance(x, (np.ndarray, tf.Tensor)) and not self.per_peer_views:
            for peer in self.peers:
                peer_checks.check_batch_axis(x, peer)
        return super().predict(x, *args, **kwargs)

    def _checked_data(self, x, y):
        """Under jit_compile (XLA drops in-graph assertions), labels checked before the
        compiled step: arrays here, a tf.data.Dataset by a check in its own pipeline."""
        if not self.jit_compile:
            return x, y
        if isinstance(x, tf.data.Dataset):
            return x.map(self._dataset_label_check), y
        if y is None:
            raise UserError("With jit_compile=True, MutualLearning checks labels before the "
                            "compiled step, which it can do for arrays and tf.data.Dataset; "
                            "pass one of those, or compile without jit_compile.")
        labels = np.asarray(y).reshape(-1)
        low = -1 if self.semi_supervised else 0
        if labels.size and (labels.min() < low or labels.max() >= self.num_classes):
            raise UserError(self._label_message())
        return x, y

    def _dataset_label_check(self, *element):
        _, labels, _ = keras.utils.unpack_x_y_sample_weight(
            element[0] if len(element) == 1 else element)
        if labels is not None:
            labels = tf.cast(labels, tf.int64)
            low = -1 if self.semi_supervised else 0
            tf.debugging.assert_equal(
                tf.reduce_all((labels >= low) & (labels < self.num_classes)), True,
                message=_LABEL_RANGE_MARK)
        return element[0] if len(element) == 1 else element

    def _label_message(self):
        low = "-1 (unlabelled) or " if self.semi_supervised else ""
        return (f"labels must be {low}class indices in [0, {self.num_classes}) for peers with "
                f"{self.num_classes} outputs; found one outside.")

    @contextlib.contextmanager
    def _label_errors(self):
        """The label checks' failure as one sentence."""
        try:
            yield
        except tf.errors.InvalidArgumentError as error:
            if _LABEL_RANGE_MARK not in str(error):
                raise
            raise UserError(self._label_message()) from None

    def _checked_held_out(self, held_out):
        """held_out as (inputs, int64 labels) numpy-sliceable, checked once."""
        if not isinstance(held_out, (tuple, list)) or len(held_out) != 2:
            raise UserError("held_out must be a pair (inputs, labels).")
        inputs, labels = held_out
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        sizes = {len(a) for a in tf.nest.flatten(inputs)}
        if not labels.size or sizes != {labels.size}:
            raise UserError(f"held_out holds {labels.size} labels and inputs of "
                            f"{sorted(sizes)} examples; pass as many inputs as labels, at least 1.")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise UserError(f"held_out's labels must be class indices in [0, {self.num_classes}).")
        return inputs, labels

    def held_out_probabilities(self, batch_size: int = 256) -> tuple[list[np.ndarray], np.ndarray]:
        """The peers' probabilities (inference mode) on `held_out`: (K [N, M] arrays, labels)."""
        inputs, labels = self._held_out
        per_peer = [[] for _ in self.peers]
        for start in range(0, labels.size, batch_size):
            batch = tf.nest.map_structure(lambda a: a[start:start + batch_size], inputs)
            for k, z in enumerate(self._logits(batch, False)):
                per_peer[k].append(tf.nn.softmax(z).numpy())
        return [np.concatenate(p) for p in per_peer], labels

    def get_config(self):
        raise UserError("MutualLearning cannot be saved as one .keras file (its peers and "
                        "method are yours to rebuild): use model.save_weights('cohort.weights.h5') "
                        "on the same peers, each peer's own save, or "
                        "dml_tf.export.export_cohort(model.cohort, folder) for serving.")

    def save(self, filepath, *args, **kwargs):
        del filepath, args, kwargs
        self.get_config()


def _check_method_inputs(method, teacher, held_out):
    """What the method needs is given, and nothing it does not use."""
    lifecycle.check_inputs(
        method, teacher=teacher is not None, held_out=held_out is not None,
        teacher_hint="pass teacher= a trained keras.Model built like peers[0] (or the path of "
                     "its .weights.h5 file)",
        held_out_hint="pass held_out=(inputs, labels), examples kept out of fit")
    if teacher is not None and not method.needs_teacher:
        raise UserError(f"teacher= is for methods with a fixed teacher (kd); method "
                        f"{method.name!r} has none: drop it.")
    if held_out is not None and not method.needs_validation:
        raise UserError(f"held_out= is for methods that re-estimate on held-out data "
                        f"(kdcl_general); method {method.name!r} does not: drop it (use fit's "
                        "validation_data to evaluate).")


def _with_loss_scaling(optimizer, peer):
    """The optimizer wrapped for dynamic loss scaling when the peer computes in float16."""
    policy = getattr(peer, "dtype_policy", None) or keras.mixed_precision.global_policy()
    if policy.compute_dtype != "float16" or isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer
    return keras.optimizers.LossScaleOptimizer(optimizer)


def _method(method, method_args):
    if not isinstance(method, str):
        if method_args:
            raise UserError(f"method arguments {', '.join(sorted(method_args))} go with a "
                            "method name; a method object already holds its own.")
        return method
    return methods.get(method, **method_args)


def _metric_names(method, num_peers, num_classes):
    """Every name train_step and test_step log: each peer's terms as the method reports them
    on a dummy batch, the step metrics around them, the ensemble's."""
    logits = [tf.zeros([1, num_classes]) for _ in range(num_peers)]
    features = [tf.zeros([1, 1]) for _ in range(num_peers)] if method.uses_features else None
    all_losses = method.losses(logits, tf.zeros([1], tf.int64), features=features)
    names = [f"peer{k}/{name}" for k, peer_losses in enumerate(all_losses, start=1)
             for name in dict.fromkeys([n for n in peer_losses if n != "total"]
                                       + ["weight_decay", "loss", "top1", "entropy"])]
    return names + ["loss", "ensemble/ce", "ensemble/top1"]


def _top1(scores, labels):
    return tf.reduce_mean(classification.top_k_correct(scores, labels, 1))

