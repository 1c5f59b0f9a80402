"""The cohort: K peer models, one optimiser each, and the two DML update orders.

The cohort calls a method to turn logits into losses; it does not know which method.
"""

import contextlib

import keras
import tensorflow as tf

from dml_tf import losses, precision
from dml_tf.errors import UserError
from dml_tf.methods import base

from dml_tf.choices import UPDATES


def check_arguments(num_peers, method, update):
    """Raises UserError unless `method` runs with `num_peers` peers in the `update` order."""
    if update not in UPDATES:
        raise UserError(f"update={update!r} is not an update order; choose one of {', '.join(UPDATES)}.")
    if not isinstance(method, base.Method):
        raise UserError(f"method must be a dml_tf.methods name or a dml_tf.methods.base.Method, "
                        f"got a {type(method).__name__}; subclass Method for a method of your own.")
    method.check_cohort_size(num_peers)


def input_shape(model, name=None):
    """The input shape, batch dimension first, of a functional, Sequential or built subclassed model.

    Args:
      model: a keras.Model.
      name: how the error message calls the model (default: by its name).

    Raises:
      UserError: the model has no input shape yet (a Sequential without `keras.Input`, a
        subclassed model never built).
    """
    try:
        return tuple(model.inputs[0].shape)
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    shape = (model.get_build_config() or {}).get("input_shape") if model.built else None
    if shape is None or not isinstance(shape, (list, tuple)) or isinstance(shape[0], (list, tuple)):
        raise UserError(
            f"{name or f'model {model.name!r}'} has no input shape; start it with "
            f"keras.Input(shape=...) or call its build((None, *shape)) before handing it over.")
    return tuple(shape)


class Cohort:
    """K ≥ 1 peers trained together on the same mini-batches.

    Update orders (paper Sec. 3.2, Algorithm 1, Sec. 4.5):
      * "sequential" (Algorithm 1): predict with all peers; for k = 1..K update θ_k from its
        loss, then recompute p_k with the new θ_k, so that peer k+1 learns from the updated
        peer k. Costs K forward+backward passes plus K−1 extra forward passes.
      * "simultaneous" (the paper's distributed variant): one forward pass of every peer,
        every peer updated from the same predictions.

    What the method declares (methods.base.Method), the cohort provides, without knowing
    the method:
      * `uses_features`: the last-pooling features ("features" layer) of every peer are
        passed to `method.losses(..., features=...)`.
      * `frozen_peers`: 0-based indices of peers that are never updated (a fixed teacher);
        they predict in inference mode.

    Weight decay is added here, as weight_decay/2·Σ‖W‖² over each peer's kernels, so that
    networks and methods stay free of regularisation details.

    The cohort owns the run's step counter (`step_counter`, one per cohort update, whichever
    peers the method updates): checkpoints, TensorBoard and resume all count with it.

    Every step reports, per peer k (the one metric vocabulary of both training paths):
    `peer{k}/ce` and the method's other terms (e.g. `mimicry`), `peer{k}/weight_decay`,
    `peer{k}/loss` (the peer's whole objective: the method's total plus weight decay),
    `peer{k}/top1` (training accuracy of the predictions the update used) and
    `peer{k}/entropy` (their mean entropy); and `loss`, the peers' mean loss.
    """

    def __init__(self, models, optimizers, method, update="sequential", *, weight_decay=0.0,
                 jit_compile=False, strategy=None, peer_devices=None, skip_nonfinite=False):
        """Args:
          models: list of K keras.Model mapping images to logits, all with one input shape.
          optimizers: list of K keras optimizers, one per model.
          method: an object with `losses(logits, labels, *, label_mask, features)`.
          update: "sequential" or "simultaneous".
          weight_decay: L2 coefficient (see class docstring).
          jit_compile: compile the steps with XLA.
          strategy: a tf.distribute strategy whose scope built the models and optimizers
            (data parallelism: every replica holds the whole cohort); None: no distribution.
          peer_devices: one device name per peer (the paper's distributed DML: peer k's
            variables and compute on its own device, only probabilities cross devices); the
            models must have been built under those devices.
          skip_nonfinite: drop a peer's update whose loss or gradients are NaN/Inf (the step's
            metrics then show the non-finite loss) instead of applying it, and one that makes
            a weight NaN/Inf (weights and optimizer state put back).
        """
        if len(models) != len(optimizers):
            raise ValueError(f"{len(models)} models but {len(optimizers)} optimizers.")
        check_arguments(len(models), method, update)
        precision.warn_if_emulated(models)
        self.models = list(models)
        self.optimizers = list(optimizers)
        self.method = method
        self.update = update
        self.weight_decay = float(weight_decay)
        self.jit_compile = bool(jit_compile)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.distributed = strategy is not None and self.strategy.num_replicas_in_sync > 1 or (
            isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy))
        self.peer_devices = list(peer_devices) if peer_devices else [None] * len(models)
        self.frozen = frozenset(method.frozen_peers)
        self._uses_features = bool(method.uses_features)
        # Same layers and weights as the peers, with the pooled features as a second output.
        self._feature_models = _feature_models(self.models, method) if self._uses_features else None
        with self.strategy.scope():
            # ONLY_FIRST_REPLICA: every replica counts the same step once.
            self.step_counter = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="step_counter",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        for k, (model, optimizer) in enumerate(zip(self.models, self.optimizers)):
            if k not in self.frozen:
                # Built eagerly so that the compiled step never creates variables; under the
                # strategy and on the peer's device, beside the weights they update.
                with self.strategy.scope(), self._on_device(k):
                    optimizer.build(model.trainable_variables)
        self._image_spec = tf.TensorSpec([None, *input_shape(models[0])[1:]], tf.float32)
        self._compiled = {}
        self._predict_features = None
        self._predict_logits = tf.function(self._logits, input_signature=[self._image_spec],
                                           jit_compile=jit_compile or None)

    @property
    def num_peers(self):
        return len(self.models)

    @property
    def steps_done(self):
        """Cohort updates so far (the value of `step_counter`)."""
        return int(self.step_counter.numpy())

    def train_step(self, images, labels, label_mask=None):
        """One cohort update on one mini-batch.

        Args:
          images: float32 [B, H, W, C], or a tuple of K such tensors: peer k's own
            augmentation of the same images (KDCL's per-peer augmentation).
          labels: int64 [B].
          label_mask: optional float [B], 1 where the label is known (semi-supervised:
            cross-entropy on those, mimicry on all).

        Returns:
          A dict of scalars, the step metrics of the class docstring.
        """
        views = isinstance(images, (list, tuple))
        masked = label_mask is not None
        step = self._compiled.get((views, masked)) or self._compile(views, masked)
        args = [tuple(images) if views else images, labels] + ([label_mask] if masked else [])
        return step(*args)

    def _compile(self, views, masked):
        """A tf.function for one input structure, with an unknown batch size: traced once."""
        image_spec = (tuple([self._image_spec] * self.num_peers) if views else self._image_spec)
        signature = [image_spec, tf.TensorSpec([None], tf.int64)]
        if masked:
            signature.append(tf.TensorSpec([None], tf.float32))

        def step(images, labels, label_mask=None):
            per_peer = list(images) if views else [images] * self.num_peers
            return self.step(per_peer, labels, label_mask)

        if self.distributed:
            # Inputs are per-replica values from a distributed dataset: no input signature
            # (their spec is the dataset's, fixed by drop_remainder, so still one trace).
            def distributed_step(*args):
                per_replica = self.strategy.run(step, args=args)
                return {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                        for k, v in per_replica.items()}

            compiled = tf.function(distributed_step)
            self._compiled[(views, masked)] = compiled
            return compiled
        compiled = tf.function(step, input_signature=signature, jit_compile=self.jit_compile or None)
        self._compiled[(views, masked)] = compiled
        return compiled

    def step(self, images_per_peer, labels, label_mask=None):
        """The update of the cohort's order, un-compiled: for a caller's own tf.function.

        `train_step` compiles this; `dml_tf.MutualLearning.train_step` calls it inside
        Keras' compiled train function. Arguments and result are `train_step`'s, with the
        images always one tensor per peer.
        """
        body = self._sequential_step if self.update == "sequential" else self._simultaneous_step
        metrics = body(list(images_per_peer), labels, label_mask)
        metrics["loss"] = tf.add_n([metrics[f"peer{k}/loss"] for k in range(1, self.num_peers + 1)]
                                   ) / float(self.num_peers)
        self.step_counter.assign_add(1)
        return metrics

    def inference_losses(self, images_per_peer, labels):
        """The peers' logits and losses in inference mode on one batch, un-compiled.

        Args:
          images_per_peer: each peer's inputs (as for `step`).
          labels: int64 [B].

        Returns:
          (K float32 [B, M] logits, K dicts of the method's terms but "total", with
          "weight_decay" and "loss" as in the step metrics).
        """
        outputs = [self._forward(k, images_per_peer[k], training=False)
                   for k in range(self.num_peers)]
        logits = [z for z, _ in outputs]
        all_losses = self._losses(logits, [f for _, f in outputs], labels, None)
        return logits, [_with_loss(peer_losses, losses.l2_weight_penalty(
            model.trainable_variables, self.weight_decay))
            for model, peer_losses in zip(self.models, all_losses)]

    @property
    def trace_count(self):
        """How many times the train steps were traced (one per input structure used)."""
        return sum(f.experimental_get_tracing_count() for f in self._compiled.values())

    def predict(self, images):
        """Per-peer class probabilities (inference mode), a list of K [B, M] tensors."""
        return [tf.nn.softmax(z) for z in self._predict_logits(images)]

    def predict_logits(self, images):
        """Per-peer logits (inference mode), a list of K [B, M] tensors."""
        return self._predict_logits(images)

    def predict_features(self, images):
        """Per-peer "features" (last pooling layer, inference mode), a list of K [B, D] tensors."""
        if self._predict_features is None:
            embedders = [keras.Model(m.inputs, m.get_layer("features").output) for m in self.models]
            self._predict_features = tf.function(
                lambda x: [tf.cast(e(x, training=False), tf.float32) for e in embedders],
                input_signature=[self._image_spec], jit_compile=self.jit_compile or None)
        return self._predict_features(images)

    def nonfinite_peers(self):
        """The peers (1-based) any of whose float variables, weights or BatchNorm statistics,
        holds a NaN or Inf: a diverged run must not be reported as a success."""
        return [k for k, model in enumerate(self.models, start=1)
                if not all(bool(tf.reduce_all(tf.math.is_finite(v.value)))
                           for v in model.variables if tf.as_dtype(v.dtype).is_floating)]

    # The step bodies below run inside tf.function.

    def _on_device(self, k):
        """Peer k's device scope; none at all otherwise (tf.device(None) would clear the
        replica's own device under a strategy)."""
        device = self.peer_devices[k]
        return tf.device(device) if device else contextlib.nullcontext()

    def _logits(self, images):
        logits = []
        for k, model in enumerate(self.models):
            with self._on_device(k):
                logits.append(tf.cast(model(images, training=False), tf.float32))
        return logits

    def _forward(self, k, images, training=None):
        """(logits, features or None) of peer k; frozen peers run in inference mode."""
        training = k not in self.frozen if training is None else training
        with self._on_device(k):
            if self._uses_features:
                features, logits = self._feature_models[k](images, training=training)
                return tf.cast(logits, tf.float32), tf.cast(features, tf.float32)
            return tf.cast(self.models[k](images, training=training), tf.float32), None

    def _losses(self, logits, features, labels, label_mask):
        return self.method.losses(logits, labels, label_mask=label_mask,
                                  features=features if self._uses_features else None)

    def _objective(self, k, peer_losses):
        """(what peer k's gradients are taken of, its weight-decay term).

        The former goes through the optimiser's `scale_loss`, as Keras' own train step
        does: the identity, except for a `LossScaleOptimizer` (mixed_float16), which
        multiplies by its dynamic scale and divides the gradients again when applying them.
        """
        penalty = losses.l2_weight_penalty(self.models[k].trainable_variables, self.weight_decay)
        objective = peer_losses["total"] + penalty
        if self.distributed:
            # Each replica's loss is a mean over its share of the global batch; the optimiser
            # sums the replicas' gradients, so 1/replicas makes them the global mean's.
            objective = objective / float(self.strategy.num_replicas_in_sync)
        return self.optimizers[k].scale_loss(objective), penalty

    def _apply(self, k, objective, tape, statistics_before=None):
        variables = self.models[k].trainable_variables
        with self._on_device(k):
            grads = tape.gradient(objective, variables)
            if not self.skip_nonfinite:
                # Under a strategy, Keras 3.15's apply_gradients sums the replicas' gradients
                # into the mirrored variables (measured: an extra all-reduce doubled the step).
                self.optimizers[k].apply_gradients(zip(grads, variables))
                return
            finite = tf.reduce_all([tf.math.is_finite(objective)] + [
                tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
            # A dropped step also puts back the BatchNorm statistics its forward pass moved
            # (huge weights make inf activations, and so inf moving statistics).
            put_back = self._put_back(self._statistics(k), statistics_before)
            tf.cond(finite, lambda: self._apply_unless_divergent(k, grads, variables, put_back),
                    put_back)

    def _apply_unless_divergent(self, k, grads, variables, put_back_statistics):
        """Applies finite gradients, then puts weights and optimizer state back if the update
        itself made a weight non-finite (e.g. a huge learning rate): a divergence is dropped."""
        optimizer = self.optimizers[k]
        state = list(variables) + list(optimizer.variables)
        put_back_state = self._put_back(state, [tf.identity(v.value) for v in state])
        optimizer.apply_gradients(zip(grads, variables))
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v.value)) for v in variables])

        def put_back():
            put_back_state()
            return put_back_statistics()

        return tf.cond(finite, lambda: tf.constant(True), put_back)

    @staticmethod
    def _put_back(variables, values):
        """A tf.cond branch assigning `values` to `variables` (none: nothing), returning False."""
        def put_back():
            for variable, value in zip(variables, values or ()):
                variable.assign(value)
            return tf.constant(False)

        return put_back

    def _statistics(self, k):
        """Peer k's non-trainable state that a training forward pass moves (BatchNorm's moving
        statistics); Dropout's seed-generator state is left to advance."""
        return [v for v in self.models[k].non_trainable_variables if "seed_generator" not in v.path]

    def _statistics_before(self):
        """Per peer, a copy of its statistics before the step (only when updates may be dropped)."""
        if not self.skip_nonfinite:
            return [None] * self.num_peers
        return [[tf.identity(v.value) for v in self._statistics(k)] for k in range(self.num_peers)]

    @staticmethod
    def _report(metrics, k, peer_losses, penalty, logits_k, labels):
        for key, value in _with_loss(peer_losses, penalty).items():
            metrics[f"peer{k + 1}/{key}"] = value
        correct = tf.equal(tf.argmax(logits_k, axis=-1, output_type=tf.int64), labels)
        metrics[f"peer{k + 1}/top1"] = tf.reduce_mean(tf.cast(correct, tf.float32))
        # The predictions' mean entropy, for collapse detection (dml_tf.collapse); a method
        # that reports its own (entropy_reg) keeps it.
        metrics.setdefault(f"peer{k + 1}/entropy", losses.entropy(logits_k))

    def _simultaneous_step(self, images, labels, label_mask):
        metrics = {}
        statistics = self._statistics_before()
        with tf.GradientTape(persistent=True) as tape:
            outputs = [self._forward(k, images[k]) for k in range(self.num_peers)]
            logits = [z for z, _ in outputs]
            all_losses = self._losses(logits, [f for _, f in outputs], labels, label_mask)
            objectives = [self._objective(k, all_losses[k]) for k in range(self.num_peers)]
        for k in range(self.num_peers):
            if k not in self.frozen:
                self._apply(k, objectives[k][0], tape, statistics[k])
            self._report(metrics, k, all_losses[k], objectives[k][1], logits[k], labels)
        del tape
        return metrics

    def _sequential_step(self, images, labels, label_mask):
        metrics = {}
        statistics = self._statistics_before()
        with tf.GradientTape(persistent=True) as tape:
            # Peer k's forward pass here uses θ_k as it is when peer k's turn comes (peers
            # after k are not yet updated), so one recorded pass per peer serves both as
            # the others' target and as peer k's own differentiable prediction.
            outputs = [self._forward(k, images[k]) for k in range(self.num_peers)]
            logits = [z for z, _ in outputs]
            features = [f for _, f in outputs]
            for k in range(self.num_peers):
                peer_losses = self._losses(logits, features, labels, label_mask)[k]
                objective, penalty = self._objective(k, peer_losses)
                with tape.stop_recording():
                    self._report(metrics, k, peer_losses, penalty, logits[k], labels)
                    if k in self.frozen:
                        continue
                    self._apply(k, objective, tape, statistics[k])
                    if k + 1 < self.num_peers:
                        logits[k], features[k] = self._refresh(k, images[k])
        del tape
        return metrics

    def _refresh(self, k, images):
        """p_k (and features) recomputed with the updated θ_k (Algorithm 1, steps 2 and 4).

        Training mode, as for the first prediction, but the BatchNorm moving statistics are
        put back afterwards: the step must move them once per peer, as in a plain update.
        """
        statistics = self._statistics(k)
        # tf.function's automatic control dependencies order these reads and assignments
        # with the forward pass's own updates of the same variables.
        saved = [tf.identity(v.value) for v in statistics]
        logits, features = self._forward(k, images)
        for variable, value in zip(statistics, saved):
            variable.assign(value)
        features = None if features is None else tf.stop_gradient(features)
        return tf.stop_gradient(logits), features


def _with_loss(peer_losses, penalty):
    """A method's terms with "total" replaced by "loss" (total + weight decay) and the
    "weight_decay" term itself: what both training paths log."""
    terms = {key: value for key, value in peer_losses.items() if key != "total"}
    terms["weight_decay"] = penalty
    terms["loss"] = peer_losses["total"] + penalty
    return terms


def _feature_models(models, method):
    """Per peer, a model of its layers giving (features, logits); refused in one sentence for
    peers without one "features" layer width."""
    widths = []
    for k, model in enumerate(models, start=1):
        try:
            features = model.get_layer("features").output
        except (ValueError, AttributeError):
            raise UserError(f"method {method.name!r} compares the peers' features, but peer {k} "
                            f"({model.name}) has no layer named 'features'; name its last pooling "
                            "layer 'features' (dml_tf.nets do) or choose another method.") from None
        widths.append(features.shape[-1])
    if len(set(widths)) > 1:
        raise UserError(f"method {method.name!r} compares the peers' features, but their widths "
                        f"differ ({', '.join(f'peer {k}: {w}' for k, w in enumerate(widths, 1))}); "
                        "choose peers whose 'features' layers have one width, or another method.")
    return [keras.Model(m.inputs, [m.get_layer("features").output, m.outputs[0]]) for m in models]
