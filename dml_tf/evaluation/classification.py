"""Classification metrics of a cohort: per peer, mean of peers, and the ensemble."""

import numpy as np


def top_k_accuracy(probs, labels, k):
    """Fraction of rows whose label is among the k largest probabilities."""
    k = min(k, probs.shape[1])
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def mean_cross_entropy(probs, labels):
    picked = probs[np.arange(len(labels)), labels]
    return float(np.mean(-np.log(np.maximum(picked, 1e-12))))


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
    """Metrics keyed as TensorBoard tags (DESIGN.md), accuracies as fractions.

    `{prefix}/peer{k}/{top1,top5,ce}` per peer (numbered from 1), `{prefix}/mean/top1,top5`
    (the average of the peers' accuracies) and `{prefix}/ensemble/top1,top5,ce` (the mean of
    the peers' probabilities).
    """
    metrics = {}
    for k, probs in enumerate(peer_probs, start=1):
        metrics[f"{prefix}/peer{k}/top1"] = top_k_accuracy(probs, labels, 1)
        metrics[f"{prefix}/peer{k}/top5"] = top_k_accuracy(probs, labels, 5)
        metrics[f"{prefix}/peer{k}/ce"] = mean_cross_entropy(probs, labels)
    for name in ("top1", "top5"):
        metrics[f"{prefix}/mean/{name}"] = float(np.mean(
            [metrics[f"{prefix}/peer{k}/{name}"] for k in range(1, len(peer_probs) + 1)]))
    ensemble = np.mean(peer_probs, axis=0)
    metrics[f"{prefix}/ensemble/top1"] = top_k_accuracy(ensemble, labels, 1)
    metrics[f"{prefix}/ensemble/top5"] = top_k_accuracy(ensemble, labels, 5)
    metrics[f"{prefix}/ensemble/ce"] = mean_cross_entropy(ensemble, labels)
    return metrics
