"""The cohort: K peer models, one optimiser each, and the two DML update orders.

The cohort calls a method to turn logits into losses; it does not know which method.
"""

import tensorflow as tf

from dml_tf import losses
from dml_tf.errors import UserError

UPDATES = ("sequential", "simultaneous")


class Cohort:
    """K ≥ 1 peers trained together on the same mini-batches.

    Update orders (paper Sec. 3.2, Algorithm 1, Sec. 4.5):
      * "sequential" (Algorithm 1): predict with all peers; for k = 1..K update θ_k from its
        loss, then recompute p_k with the new θ_k, so that peer k+1 learns from the updated
        peer k. Costs K forward+backward passes plus K−1 extra forward passes.
      * "simultaneous" (the paper's distributed variant): one forward pass of every peer,
        every peer updated from the same predictions.

    Weight decay is added here, as weight_decay/2·Σ‖W‖² over each peer's kernels, so that
    networks and methods stay free of regularisation details.
    """

    def __init__(self, models, optimizers, method, update="sequential", *, weight_decay=0.0,
                 jit_compile=False):
        """Args:
          models: list of K keras.Model mapping images to logits, all with one input shape.
          optimizers: list of K keras optimizers, one per model.
          method: an object with `losses(logits, labels, *, label_mask, features)`.
          update: "sequential" or "simultaneous".
          weight_decay: L2 coefficient (see class docstring).
          jit_compile: compile the steps with XLA.
        """
        if len(models) != len(optimizers):
            raise ValueError(f"{len(models)} models but {len(optimizers)} optimizers.")
        if update not in UPDATES:
            raise UserError(f"--update={update} is not an update order; choose one of {', '.join(UPDATES)}.")
        if hasattr(method, "check_cohort_size"):
            method.check_cohort_size(len(models))
        self.models = list(models)
        self.optimizers = list(optimizers)
        self.method = method
        self.update = update
        self.weight_decay = float(weight_decay)
        for model, optimizer in zip(self.models, self.optimizers):
            # Built eagerly so that the compiled step never creates variables.
            optimizer.build(model.trainable_variables)
        image_spec = tf.TensorSpec([None, *models[0].input_shape[1:]], tf.float32)
        label_spec = tf.TensorSpec([None], tf.int64)
        # An input signature with an unknown batch size: traced once, whatever the batch.
        step = self._sequential_step if update == "sequential" else self._simultaneous_step
        self._train_step = tf.function(step, input_signature=[image_spec, label_spec],
                                       jit_compile=jit_compile or None)
        self._predict_logits = tf.function(self._logits, input_signature=[image_spec],
                                           jit_compile=jit_compile or None)

    @property
    def num_peers(self):
        return len(self.models)

    def train_step(self, images, labels):
        """One cohort update on one mini-batch.

        Returns:
          A dict of scalars: "peer{k}/{ce,mimicry,total,weight_decay,top1}" for k = 1..K
          (top1 = training accuracy of the predictions the update used).
        """
        return self._train_step(images, labels)

    def predict(self, images):
        """Per-peer class probabilities (inference mode), a list of K [B, M] tensors."""
        return [tf.nn.softmax(z) for z in self._predict_logits(images)]

    def predict_logits(self, images):
        """Per-peer logits (inference mode), a list of K [B, M] tensors."""
        return self._predict_logits(images)

    # The step bodies below run inside tf.function.

    def _logits(self, images):
        return [tf.cast(m(images, training=False), tf.float32) for m in self.models]

    def _objective(self, k, peer_losses):
        penalty = losses.l2_weight_penalty(self.models[k].trainable_variables, self.weight_decay)
        return peer_losses["total"] + penalty, penalty

    def _apply(self, k, objective, tape):
        variables = self.models[k].trainable_variables
        grads = tape.gradient(objective, variables)
        self.optimizers[k].apply_gradients(zip(grads, variables))

    @staticmethod
    def _report(metrics, k, peer_losses, penalty, logits_k, labels):
        for key, value in peer_losses.items():
            metrics[f"peer{k + 1}/{key}"] = value
        metrics[f"peer{k + 1}/weight_decay"] = penalty
        correct = tf.equal(tf.argmax(logits_k, axis=-1, output_type=tf.int64), labels)
        metrics[f"peer{k + 1}/top1"] = tf.reduce_mean(tf.cast(correct, tf.float32))

    def _simultaneous_step(self, images, labels):
        metrics = {}
        with tf.GradientTape(persistent=True) as tape:
            logits = [tf.cast(m(images, training=True), tf.float32) for m in self.models]
            all_losses = self.method.losses(logits, labels)
            objectives = [self._objective(k, all_losses[k]) for k in range(self.num_peers)]
        for k in range(self.num_peers):
            self._apply(k, objectives[k][0], tape)
            self._report(metrics, k, all_losses[k], objectives[k][1], logits[k], labels)
        del tape
        return metrics

    def _sequential_step(self, images, labels):
        metrics = {}
        with tf.GradientTape(persistent=True) as tape:
            # Peer k's forward pass here uses θ_k as it is when peer k's turn comes (peers
            # after k are not yet updated), so one recorded pass per peer serves both as
            # the others' target and as peer k's own differentiable prediction.
            logits = [tf.cast(m(images, training=True), tf.float32) for m in self.models]
            for k in range(self.num_peers):
                peer_losses = self.method.losses(logits, labels)[k]
                objective, penalty = self._objective(k, peer_losses)
                with tape.stop_recording():
                    self._apply(k, objective, tape)
                    self._report(metrics, k, peer_losses, penalty, logits[k], labels)
                    if k + 1 < self.num_peers:
                        logits[k] = self._refresh(k, images)
        del tape
        return metrics

    def _refresh(self, k, images):
        """p_k recomputed with the updated θ_k (Algorithm 1, steps 2 and 4).

        Training mode, as for the first prediction, but the BatchNorm moving statistics are
        put back afterwards: the step must move them once per peer, as in a plain update.
        """
        model = self.models[k]
        # Dropout's seed-generator state is not put back: the next pass must draw new masks.
        statistics = [v for v in model.non_trainable_variables if "seed_generator" not in v.path]
        # tf.function's automatic control dependencies order these reads and assignments
        # with the forward pass's own updates of the same variables.
        saved = [tf.identity(v.value) for v in statistics]
        refreshed = tf.stop_gradient(tf.cast(model(images, training=True), tf.float32))
        for variable, value in zip(statistics, saved):
            variable.assign(value)
        return refreshed
