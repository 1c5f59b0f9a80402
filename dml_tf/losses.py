"""Pure tensor functions for the losses of docs/methods.md.

Conventions (paper Eq. 4): divergences sum over classes and average over the batch.
No function here stops gradients: which side of a divergence is a constant target is
the calling method's decision (paper Sec. 3: a peer's loss changes only its own weights).
"""

from collections.abc import Iterable

import tensorflow as tf

# What the functions take: tensors, numpy arrays or Python numbers (anything tf.convert_to_tensor reads).
TensorLike = tf.types.experimental.TensorLike


def _masked_mean(per_example, mask):
    """Mean of `per_example` over the examples where `mask` is 1 (all when mask is None).

    An all-zero mask gives 0, not NaN, so a batch without labelled examples contributes
    no supervised loss (semi-supervised training, paper Sec. 3.4).
    """
    if mask is None:
        return tf.reduce_mean(per_example)
    mask = tf.cast(mask, per_example.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(per_example * mask), tf.reduce_sum(mask))


def cross_entropy(labels: TensorLike, logits: TensorLike, *, label_smoothing: float = 0.0,
                  mask: TensorLike | None = None) -> tf.Tensor:
    """Softmax cross-entropy, mean over the batch (or over examples with mask 1).

    Args:
      labels: int [B] class indices.
      logits: float [B, M].
      label_smoothing: ε; the target is (1 − ε)·onehot + ε/M.
      mask: optional [B] of 0/1: which examples carry a label.

    Returns:
      Scalar float32.
    """
    logits = tf.cast(logits, tf.float32)
    num_classes = tf.shape(logits)[-1]
    targets = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / tf.cast(num_classes, tf.float32)
    per_example = -tf.reduce_sum(targets * tf.nn.log_softmax(logits), axis=-1)
    return _masked_mean(per_example, mask)


def kl_divergence(target_probs: TensorLike, logits: TensorLike, *,
                  mask: TensorLike | None = None) -> tf.Tensor:
    """KL(p_target ‖ softmax(logits)) = Σ_m p^m (log p^m − log q^m), mean over the batch.

    Terms with p^m = 0 contribute 0 (the limit of p log p), so one-hot targets are fine.

    Args:
      target_probs: float [B, M], rows summing to 1.
      logits: float [B, M] of the distribution being fitted.
      mask: optional [B] of 0/1 selecting the examples averaged over.

    Returns:
      Scalar float32.
    """
    target_probs = tf.cast(target_probs, tf.float32)
    log_q = tf.nn.log_softmax(tf.cast(logits, tf.float32))
    per_example = tf.reduce_sum(
        tf.math.xlogy(target_probs, target_probs) - target_probs * log_q, axis=-1)
    return _masked_mean(per_example, mask)


def entropy(logits: TensorLike, *, mask: TensorLike | None = None) -> tf.Tensor:
    """Posterior entropy H(softmax(logits)) = −Σ_m p^m log p^m (nats), mean over the batch."""
    logits = tf.cast(logits, tf.float32)
    probs = tf.nn.softmax(logits)
    per_example = -tf.reduce_sum(probs * tf.nn.log_softmax(logits), axis=-1)
    return _masked_mean(per_example, mask)


def l2_weight_penalty(variables: Iterable[tf.Variable], weight_decay: float) -> tf.Tensor:
    """weight_decay/2 · Σ‖W‖² over the kernels (rank ≥ 2) among `variables`.

    The ½ makes the gradient weight_decay·W, i.e. the same update as Torch/PyTorch SGD's
    `weight_decay` used by the WRN reference setting the paper follows (5e-4). Biases and
    BatchNorm parameters (rank 1) are not decayed.
    """
    kernels = [v for v in variables if len(v.shape) >= 2]
    if not weight_decay or not kernels:
        return tf.constant(0.0)
    return 0.5 * weight_decay * tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in kernels])
