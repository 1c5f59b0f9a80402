"""Classification metrics of a cohort: per peer, mean of peers, and the ensemble.

The per-example quantities (`top_k_correct`, `cross_entropy_per_example`) are TensorFlow
ops, written once for both training paths: the run scripts average them over a whole test
set (`cohort_metrics`), `MutualLearning.evaluate` over its batches (batch-weighted, the same
mean).
"""

import itertools

import numpy as np
import tensorflow as tf

# Where p^y is clipped in the cross-entropy: a probability of 0 would make it infinite.
MIN_PROBABILITY = 1e-12


def top_k_correct(probs, labels, k):
    """[N] float32, 1 where the label is among the k largest of [N, M] `probs` (a class tied
    with the k-th counts as among them)."""
    probs = tf.convert_to_tensor(probs, tf.float32)
    k = min(int(k), int(probs.shape[-1]))
    return tf.cast(tf.math.in_top_k(tf.cast(labels, tf.int64), probs, k), tf.float32)


def cross_entropy_per_example(probs, labels):
    """[N] float32 −log p^y of [N, M] probabilities (p^y clipped at MIN_PROBABILITY)."""
    probs = tf.convert_to_tensor(probs, tf.float32)
    picked = tf.gather(probs, tf.cast(labels, tf.int64), axis=1, batch_dims=1)
    return -tf.math.log(tf.maximum(picked, MIN_PROBABILITY))


def top_k_accuracy(probs, labels, k):
    """Fraction of rows whose label is among the k largest probabilities."""
    return float(tf.reduce_mean(top_k_correct(probs, labels, k)))


def mean_cross_entropy(probs, labels):
    """Mean −log p^y of [N, M] probabilities (clipped: a zero would be infinite)."""
    return float(tf.reduce_mean(cross_entropy_per_example(probs, labels)))


def collect_probabilities(predict_fn, dataset):
    """Runs `predict_fn(images) -> list of [B, M] probabilities` over `dataset`.

    Returns:
      (list of K float32 [N, M] arrays, int64 [N] labels).
    """
    per_peer, labels = None, []
    for images, batch_labels in dataset:
        probs = predict_fn(images)
        if per_peer is None:
            per_peer = [[] for _ in probs]
        for k, p in enumerate(probs):
            per_peer[k].append(np.asarray(p))
        labels.append(np.asarray(batch_labels))
    return [np.concatenate(p) for p in per_peer], np.concatenate(labels).astype(np.int64)


def cohort_metrics(peer_probs, labels, prefix="test"):
    """Metrics keyed as TensorBoard tags (docs/design.md), accuracies as fractions.

    `{prefix}/peer{k}/{top1,top5,ce}` per peer (numbered from 1), `{prefix}/mean/...` with
    the same names (the average of the peers' values: what a paper's per-network number
    describes), `{prefix}/ensemble/...` (the metrics of the mean of the peers'
    probabilities) and, for two or more peers, `{prefix}/agreement` (see `agreement`).
    """
    metrics = {}
    per_peer = [_metrics(probs, labels) for probs in peer_probs]
    for k, values in enumerate(per_peer, start=1):
        metrics.update({f"{prefix}/peer{k}/{name}": v for name, v in values.items()})
    for name in per_peer[0]:
        metrics[f"{prefix}/mean/{name}"] = float(np.mean([v[name] for v in per_peer]))
    ensemble = _metrics(np.mean(peer_probs, axis=0), labels)
    metrics.update({f"{prefix}/ensemble/{name}": v for name, v in ensemble.items()})
    if len(peer_probs) > 1:
        metrics[f"{prefix}/agreement"] = agreement(peer_probs)
    return metrics


def agreement(peer_probs):
    """Fraction of images on which the peers predict the same class (their top-1).

    For K > 2 peers: the mean over the K(K−1)/2 pairs of each pair's fraction (not the
    fraction on which all K agree), so that it reads the same for any cohort size.
    """
    predicted = [np.argmax(p, axis=1) for p in peer_probs]
    pairs = itertools.combinations(predicted, 2)
    return float(np.mean([np.mean(a == b) for a, b in pairs]))


def _metrics(probs, labels):
    """top1, top5 and ce of one [N, M] array of probabilities."""
    return {"top1": top_k_accuracy(probs, labels, 1), "top5": top_k_accuracy(probs, labels, 5),
            "ce": mean_cross_entropy(probs, labels)}
