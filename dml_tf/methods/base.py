"""Base class of the methods: logits in, one dict of losses per peer out."""

import math

import tensorflow as tf

from dml_tf import losses
from dml_tf.errors import UserError


class Method:
    """Turns the cohort's logits into per-peer losses; knows nothing of optimisers or data.

    Subclasses implement `mimicry(logits, k, *, features)` (the term added to peer k's
    cross-entropy) or override `losses`. Targets built from other peers must be wrapped in
    `tf.stop_gradient`: a peer's loss changes only its own weights.

    What a method needs beyond `losses` is declared here, each with a default, and driven by
    `dml_tf.lifecycle.MethodLifecycle` for both the run scripts and `MutualLearning.fit`: a
    method behaves the same on both paths, or is refused in one sentence.

    Attributes:
      name: registry name.
      min_peers: the smallest cohort the method is defined for.
      frozen_peers: 0-based indices of peers the cohort never updates and runs in inference
        mode (kd's fixed teacher).
      needs_teacher: the frozen peers must hold a trained teacher before the first step: the
        run scripts restore it from --teacher_checkpoint, `MutualLearning` takes `teacher=`
        (a trained keras.Model of the same architecture, or its weights file). Refused
        without one.
      needs_validation: the method re-estimates something on held-out data before every
        epoch (`update_weights`): the run scripts hold out --val_fraction of the training
        set, `MutualLearning` takes `held_out=(inputs, labels)`. Refused without it.
      uses_features: `losses` gets `features=`, every peer's "features" layer output
        (the peers must have such a layer, of one width).
      mutual: the peers learn from each other (a mimicry term between peers), which the
        collapse warning names as what holds a collapsed cohort in place.
    """

    name = "base"
    min_peers = 1
    frozen_peers = ()
    needs_teacher = False
    needs_validation = False
    uses_features = False
    mutual = True

    def __init__(self, label_smoothing=0.0):
        """Args: label_smoothing: ε of the cross-entropy targets (0 in the paper's CIFAR runs)."""
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = float(label_smoothing)

    def check_cohort_size(self, num_peers):
        """Raises UserError when the method cannot run with `num_peers` peers."""
        if num_peers < self.min_peers:
            raise UserError(
                f"method={self.name!r} needs at least {self.min_peers} peers, got {num_peers}; "
                f"pass {self.min_peers} or more models in peers.")

    def update_weights(self, peer_probs, labels):
        """The per-epoch hook of methods with `needs_validation`, called before each epoch.

        Args:
          peer_probs: list of K numpy [N, M] class probabilities of the peers (inference
            mode) on the held-out examples.
          labels: numpy int [N] of those examples.
        """
        del peer_probs, labels  # nothing to re-estimate by default

    def summaries(self):
        """{TensorBoard tag: float} of the method's own state, logged after every epoch."""
        return {}

    def mimicry(self, logits, k, *, features=None):
        """The mimicry term of peer k (0-based index), or None for a method without one."""
        return None

    def losses(self, logits, labels, *, label_mask=None, features=None):
        """Per-peer losses.

        Args:
          logits: list of K float [B, M] tensors, one per peer.
          labels: int [B].
          label_mask: optional [B] of 0/1: which examples are labelled (cross-entropy is
            averaged over those only; mimicry over all, paper Sec. 3.4).
          features: optional list of K [B, D] last-pooling features.

        Returns:
          A list of K dicts with "total", "ce" and, where the method has one, "mimicry".
        """
        self.check_cohort_size(len(logits))
        out = []
        for k, logits_k in enumerate(logits):
            ce = losses.cross_entropy(labels, logits_k, label_smoothing=self.label_smoothing,
                                      mask=label_mask)
            terms = {"ce": ce}
            mimicry = self.mimicry(logits, k, features=features)
            if mimicry is not None:
                terms["mimicry"] = mimicry
            terms["total"] = tf.add_n(list(terms.values()))
            out.append(terms)
        return out


def hyperparameter(value, name, what, valid):
    """float(value) if it is a finite number passing `valid`, else a UserError naming it.

    Args:
      value: the argument as given (a number, or a string that did not parse as one).
      name: the hyperparameter's name, e.g. "temperature".
      what: the rule in words for the message, e.g. "a positive number".
      valid: predicate on the float.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or not valid(number):
        raise UserError(f"method argument {name} must be {what}, got {value!r}.")
    return number


def peer_probabilities(logits):
    """softmax of every peer's logits as constants (targets for the other peers)."""
    return [tf.stop_gradient(tf.nn.softmax(tf.cast(z, tf.float32))) for z in logits]
