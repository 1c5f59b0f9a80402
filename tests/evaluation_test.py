"""The cohort metrics' mean-of-peers entries (the numpy mean) and the peers' agreement."""

import numpy as np
import pytest
import tensorflow as tf

from data_market1501_test import write_market  # the tiny Market layout of the loader tests
from dml_tf import reid_task
from dml_tf.data import market1501
from dml_tf.evaluation import classification


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _names(metrics, who):
    return {k.split("/", 2)[2] for k in metrics if k.split("/")[1] == who}


def test_classification_mean_has_every_peer_metric_and_equals_the_numpy_mean():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 50)
    probs = [_softmax(rng.normal(size=(50, 8)) * s).astype(np.float32) for s in (1.0, 3.0, 0.5)]
    metrics = classification.cohort_metrics(probs, labels)
    assert _names(metrics, "peer1") == _names(metrics, "mean") == _names(metrics, "ensemble") == {
        "top1", "top5", "ce"}
    ce = [np.mean(-np.log(p[np.arange(50), labels])) for p in probs]
    top1 = [np.mean(p.argmax(axis=1) == labels) for p in probs]
    top5 = [np.mean([y in np.argsort(-row)[:5] for row, y in zip(p, labels)]) for p in probs]
    assert metrics["test/peer2/ce"] == pytest.approx(ce[1], rel=1e-5)
    assert metrics["test/mean/ce"] == pytest.approx(np.mean(ce), rel=1e-5)
    assert metrics["test/mean/top1"] == pytest.approx(np.mean(top1))
    assert metrics["test/mean/top5"] == pytest.approx(np.mean(top5))
    average = np.mean(probs, axis=0)
    assert metrics["test/ensemble/ce"] == pytest.approx(
        np.mean(-np.log(average[np.arange(50), labels])), rel=1e-5)


def _one_hot_ish(classes, num_classes=4):
    """Probabilities whose top class is `classes[i]` in row i (0.7 there, 0.1 elsewhere)."""
    probs = np.full((len(classes), num_classes), 0.1, np.float32)
    probs[np.arange(len(classes)), classes] = 0.7
    return probs


def test_agreement_of_two_peers_is_the_fraction_of_images_with_the_same_top1():
    first, second = [0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 3, 3, 2, 1, 2, 0]  # same on 5 of 8
    labels = np.zeros(8, np.int64)
    metrics = classification.cohort_metrics([_one_hot_ish(first), _one_hot_ish(second)], labels)
    assert metrics["test/agreement"] == pytest.approx(5 / 8, rel=1e-9)
    # Agreement is about the peers, not the labels: the same predictions, other labels.
    other = classification.cohort_metrics([_one_hot_ish(first), _one_hot_ish(second)],
                                          np.arange(8) % 4, prefix="val")
    assert other["val/agreement"] == pytest.approx(5 / 8, rel=1e-9)


def test_agreement_of_three_peers_is_the_mean_over_pairs_against_numpy():
    rng = np.random.default_rng(3)
    probs = [_softmax(rng.normal(size=(40, 5)) * 2).astype(np.float32) for _ in range(3)]
    top1 = [p.argmax(axis=1) for p in probs]
    pairs = [np.mean(top1[i] == top1[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    metrics = classification.cohort_metrics(probs, rng.integers(0, 5, 40))
    assert metrics["test/agreement"] == pytest.approx(np.mean(pairs), rel=1e-9)
    # Hand-counted: a-b agree on 3/4, a-c on 2/4, b-c on 1/4 images, mean 1/2 (not "all three
    # agree", which would be 1/4 here).
    a, b, c = [0, 1, 2, 3], [0, 1, 2, 0], [0, 2, 1, 3]
    hand = classification.cohort_metrics([_one_hot_ish(x) for x in (a, b, c)], np.zeros(4, int))
    assert hand["test/agreement"] == pytest.approx(0.5, rel=1e-9)


def test_a_single_peer_has_no_agreement():
    metrics = classification.cohort_metrics([_one_hot_ish([0, 1])], np.zeros(2, np.int64))
    assert not any(k.endswith("agreement") for k in metrics)


class _FixedFeatures:
    """A cohort whose peers' features are fixed functions of the pixels (known in numpy)."""

    def predict_features(self, images):
        pooled = tf.reduce_mean(images, axis=[1, 2])  # [B, 3] mean colour
        return [pooled, tf.square(pooled) + 0.1 * pooled[:, :1]]


def test_reid_mean_has_every_peer_metric_and_equals_the_numpy_mean(tmp_path):
    root = str(tmp_path / market1501.DATASET_FOLDER)
    write_market(root)
    task = reid_task.ReidTask(market1501.scan(root), (12, 6))
    metrics = task.evaluate(_FixedFeatures(), batch_size=3)
    peer_names = _names(metrics, "peer1")
    assert {"mAP", "rank1", "rank5", "rank10", "mq_mAP", "mq_rank1"} <= peer_names
    assert peer_names == _names(metrics, "peer2") == _names(metrics, "mean") == _names(
        metrics, "ensemble")
    for name in peer_names:
        assert metrics[f"test/mean/{name}"] == pytest.approx(
            np.mean([metrics[f"test/peer{k}/{name}"] for k in (1, 2)]))
