"""`MutualLearning`: Deep Mutual Learning as a Keras model, trained with compile/fit.

    model = dml_tf.MutualLearning([net_a, net_b], method="dml")
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.fit(images, labels, validation_data=(test_images, test_labels), epochs=10)

The update that `fit` runs is `Cohort.step`, the cohort's own sequential or simultaneous
step body, inside Keras' compiled train function: one implementation of the update orders.
"""

import contextlib
import sys

import keras
import tensorflow as tf

from dml_tf import cohort as cohort_lib
from dml_tf import collapse, methods
from dml_tf.errors import UserError

# Carried by the in-graph label check, so that its failure can become a UserError.
_LABEL_RANGE_MARK = "dml_tf: label outside [0, num_classes)"


class MutualLearning(keras.Model):
    """A cohort of K peers trained together, each on cross-entropy plus mimicry of the others.

    Logs, per peer k (epoch running means, as Keras metrics are): `peer{k}/ce`,
    `peer{k}/mimicry` (for methods with a mimicry term; other methods' terms, e.g.
    entropy_reg's, by their own names), `peer{k}/loss` (the peer's whole
    objective: the method's total plus weight decay), `peer{k}/accuracy`, `peer{k}/entropy`
    (training only: the predictions' mean entropy, for collapse detection); and `loss`, the
    peers' mean loss, for Keras' defaults (EarlyStopping, ModelCheckpoint). Evaluation adds
    `ensemble/loss` and `ensemble/accuracy` of the mean of the peers' probabilities.

    Calling the model (`predict`) gives the ensemble's probabilities; `peer_logits` the
    peers' logits; `cohort` the underlying `dml_tf.cohort.Cohort` (for
    `dml_tf.export.export_cohort`). Keras' `optimizer` attribute is the first updated peer's
    optimizer (its iterations and learning rate are what Keras' callbacks log).
    """

    def __init__(self, peers, method="dml", update="sequential", weight_decay=0.0, *,
                 on_collapse="warn", **method_args):
        """Args:
          peers: list of K ≥ 1 built Keras models (functional, Sequential or subclassed)
            mapping the same inputs to logits (no final softmax).
          method: a name of `dml_tf.methods.NAMES`, or a method object.
          update: "sequential" (paper Algorithm 1) or "simultaneous".
          weight_decay: λ of λ/2·Σ‖W‖² over every peer's kernels.
          on_collapse: after an epoch in which every peer predicts near-uniform
            probabilities (dml_tf.collapse), "warn" (one line on stderr, `collapsed` = 1 in
            the epoch's logs) or "stop" (the same, and fit stops as EarlyStopping does).
          **method_args: the method's hyperparameters (e.g. temperature=2), with a name.
        """
        peers = _checked_peers(peers)
        method = _method(method, method_args)
        cohort_lib.check_arguments(len(peers), method, update)
        if on_collapse not in collapse.ON_COLLAPSE:
            raise UserError(f"on_collapse={on_collapse!r} is not one of "
                            f"{', '.join(map(repr, collapse.ON_COLLAPSE))}.")
        super().__init__(name="mutual_learning")
        self.on_collapse = on_collapse
        self.peers = peers
        self.method = method
        self.update_order = update
        self.weight_decay = float(weight_decay)
        self.num_classes = _num_classes(peers)
        self._cohort = None
        self._terms = _method_terms(method, len(peers), self.num_classes)
        names = [f"peer{k}/{name}" for k, terms in enumerate(self._terms, start=1)
                 for name in dict.fromkeys(terms + ["loss", "accuracy", "entropy"])]
        self._trackers = {name: keras.metrics.Mean(name=name) for name in
                          names + ["loss", "ensemble/loss", "ensemble/accuracy"]}
        self.built = True

    @property
    def num_peers(self):
        return len(self.peers)

    @property
    def cohort(self):
        """The `dml_tf.cohort.Cohort` of the peers and their optimizers (after `compile`)."""
        if self._cohort is None:
            raise UserError("MutualLearning has no cohort before compile(); call "
                            "compile(optimizer=...) first.")
        return self._cohort

    @property
    def metrics(self):
        return list(self._trackers.values())

    def compile(self, optimizer="rmsprop", *, run_eagerly=False, steps_per_execution=1,
                jit_compile=False):
        """Args:
          optimizer: one optimizer (or its name), copied for every peer so that each has its
            own slots, or a list of K optimizers, one per peer.
          run_eagerly, steps_per_execution, jit_compile: as for `keras.Model.compile`.
        """
        optimizers = self._peer_optimizers(optimizer)
        self._cohort = cohort_lib.Cohort(self.peers, optimizers, self.method, self.update_order,
                                         weight_decay=self.weight_decay,
                                         strategy=self.distribute_strategy)
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

    def peer_logits(self, inputs):
        """The K peers' logits (inference mode), a list of float32 [B, M] tensors."""
        return self._logits(inputs, False)

    def _logits(self, inputs, training):
        images = tf.cast(inputs, tf.float32)
        return [tf.cast(peer(images, training=training), tf.float32) for peer in self.peers]

    def train_step(self, data):
        images, labels = self._unpack(data)
        stats = self.cohort.step([images] * self.num_peers, labels)
        per_peer = []
        for k, terms in enumerate(self._terms, start=1):
            values = {name: stats[f"peer{k}/{name}"] for name in terms}
            values["loss"] = stats[f"peer{k}/total"] + stats[f"peer{k}/weight_decay"]
            values["accuracy"] = stats[f"peer{k}/top1"]
            values["entropy"] = stats[f"peer{k}/entropy"]
            per_peer.append(values)
        return self._record(per_peer, tf.shape(labels)[0])

    def test_step(self, data):
        images, labels = self._unpack(data)
        logits, all_losses = self.cohort.inference_losses(images, labels)
        per_peer = []
        for logits_k, peer_losses, terms in zip(logits, all_losses, self._terms):
            values = {name: peer_losses[name] for name in terms}
            values["loss"] = peer_losses["total"] + peer_losses["weight_decay"]
            values["accuracy"] = _accuracy(labels, logits_k)
            per_peer.append(values)
        probs = tf.add_n([tf.nn.softmax(z) for z in logits]) / float(len(logits))
        ensemble = {"ensemble/loss": tf.reduce_mean(
                        keras.losses.sparse_categorical_crossentropy(labels, probs)),
                    "ensemble/accuracy": _accuracy(labels, probs)}
        return self._record(per_peer, tf.shape(labels)[0], ensemble)

    def _record(self, per_peer, batch_size, extra=None):
        """Updates the running means (weighted by the batch size) and returns them."""
        weight = tf.cast(batch_size, tf.float32)
        values = {f"peer{k}/{name}": v for k, peer in enumerate(per_peer, start=1)
                  for name, v in peer.items()}
        values["loss"] = tf.add_n([peer["loss"] for peer in per_peer]) / float(len(per_peer))
        values.update(extra or {})
        for name, value in values.items():
            self._trackers[name].update_state(value, sample_weight=weight)
        return {name: self._trackers[name].result() for name in values}

    def _unpack(self, data):
        """(float32 inputs, checked int64 [B] labels) of one batch."""
        inputs, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if labels is None:
            raise UserError("MutualLearning needs labels; pass y to fit/evaluate, or a dataset "
                            "of (inputs, labels) pairs.")
        if sample_weight is not None:
            raise UserError("MutualLearning does not take sample weights; pass (inputs, "
                            "labels) without a third element.")
        return tf.cast(inputs, tf.float32), self._labels(labels)

    def _labels(self, labels):
        labels = tf.convert_to_tensor(labels)
        shape, m = labels.shape, self.num_classes
        if shape.rank == 2 and shape[-1] == m and m > 1:
            raise UserError(f"labels of shape {shape} look one-hot; pass class indices of shape "
                            "[B] instead (e.g. labels.argmax(-1)).")
        if not labels.dtype.is_integer:
            raise UserError(f"labels must be integer class indices (e.g. int32, int64, uint8), "
                            f"got {labels.dtype.name}.")
        if shape.rank == 2 and shape[-1] == 1:
            labels = tf.squeeze(labels, axis=-1)
        elif shape.rank != 1:
            raise UserError(f"labels must have shape [B] or [B, 1], got {shape}.")
        labels = tf.cast(labels, tf.int64)
        in_range = tf.reduce_all((labels >= 0) & (labels < m))
        with tf.control_dependencies([tf.debugging.Assert(in_range, [_LABEL_RANGE_MARK])]):
            return tf.identity(labels)

    def fit(self, *args, callbacks=None, **kwargs):
        # First, so that the callbacks after it (TensorBoard, CSVLogger) log `collapsed` too.
        callbacks = [_CollapseMonitor(self.num_classes, self.num_peers, self.on_collapse),
                     *(callbacks or [])]
        with self._label_errors():
            return super().fit(*args, callbacks=callbacks, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self._label_errors():
            return super().evaluate(*args, **kwargs)

    @contextlib.contextmanager
    def _label_errors(self):
        """The in-graph label check's failure as one sentence."""
        try:
            yield
        except tf.errors.InvalidArgumentError as error:
            if _LABEL_RANGE_MARK not in str(error):
                raise
            raise UserError(f"labels must be class indices in [0, {self.num_classes}) for peers "
                            f"with {self.num_classes} outputs; found one outside.") from None


class _CollapseMonitor(keras.callbacks.Callback):
    """dml_tf.collapse on the epoch's training logs: a warning, `collapsed` in the logs, and
    with on_collapse="stop" the end of fit."""

    def __init__(self, num_classes, num_peers, on_collapse):
        super().__init__()
        self.num_classes, self.num_peers, self.on_collapse = num_classes, num_peers, on_collapse

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        found = collapse.collapsed_peers(logs, self.num_classes, self.num_peers)
        logs["collapsed"] = float(bool(found))
        if not found:
            return
        print("warning: " + collapse.describe(
            found, self.num_classes, epoch + 1,
            "try dml_tf.schedules.LinearWarmup or a lower learning rate"), file=sys.stderr)
        if self.on_collapse == "stop":
            self.model.stop_training = True


def _checked_peers(peers):
    """The peers as a list, refused in one sentence if they cannot be a cohort."""
    if isinstance(peers, keras.Model) or not isinstance(peers, (list, tuple)) or not peers:
        raise UserError("peers must be a non-empty list of keras.Model, one per peer.")
    shapes = []
    for k, peer in enumerate(peers):
        if not isinstance(peer, keras.Model):
            raise UserError(f"peers[{k}] is a {type(peer).__name__}, not a keras.Model.")
        shapes.append(cohort_lib.input_shape(peer, name=f"peers[{k}]")[1:])
        if _ends_in_softmax(peer):
            raise UserError(f"peers[{k}] ends in a softmax, but peers must output logits; "
                            "remove the final softmax (its activation or layer).")
    if len(set(shapes)) > 1:
        raise UserError(f"peers must all take the same input shape, got {shapes}.")
    if len(set(map(id, peers))) != len(peers):
        raise UserError("peers must be distinct models; the same model appears twice.")
    return list(peers)


def _ends_in_softmax(peer):
    """Whether a functional or Sequential peer's last layer is a softmax (subclassed peers
    cannot be inspected)."""
    if not getattr(peer, "layers", None) or not _has_graph(peer):
        return False
    last = peer.layers[-1]
    return (isinstance(last, keras.layers.Softmax)
            or getattr(last, "activation", None) is keras.activations.softmax)


def _has_graph(peer):
    try:
        return bool(peer.outputs)
    except (AttributeError, ValueError):
        return False


def _num_classes(peers):
    widths = []
    for peer in peers:
        spec = peer.compute_output_spec(keras.KerasTensor(cohort_lib.input_shape(peer)))
        widths.append(spec.shape[-1])
    if len(set(widths)) > 1:
        raise UserError(f"peers must all output the same number of classes, got {widths}.")
    return widths[0]


def _method(method, method_args):
    if not isinstance(method, str):
        if method_args:
            raise UserError(f"method arguments {', '.join(sorted(method_args))} go with a "
                            "method name; a method object already holds its own.")
        return method
    return methods.get(method, **method_args)


def _method_terms(method, num_peers, num_classes):
    """Each peer's loss terms but "total" ("ce", "mimicry", ...), as the method reports them
    on a dummy batch."""
    logits = [tf.zeros([1, num_classes]) for _ in range(num_peers)]
    features = [tf.zeros([1, 1]) for _ in range(num_peers)]
    all_losses = method.losses(
        logits, tf.zeros([1], tf.int64),
        features=features if getattr(method, "uses_features", False) else None)
    return [[name for name in peer_losses if name != "total"] for peer_losses in all_losses]


def _accuracy(labels, scores):
    return tf.reduce_mean(keras.metrics.sparse_categorical_accuracy(labels, scores))
