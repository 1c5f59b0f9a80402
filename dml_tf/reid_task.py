"""Market-1501 as a training task: identity classification, evaluated by retrieval.

Training is 751-way identity classification; testing ranks the gallery by the Euclidean
distance of L2-normalised "features" (the last pooling layer), paper Sec. 4.1. A cohort is
scored per peer, as the mean over peers (paper Table 3) and as an ensemble whose feature
concatenates the peers' normalised features (paper Fig. 3b).
"""

import numpy as np
import tensorflow as tf

from dml_tf import data as data_lib
from dml_tf import tasks
from dml_tf.data import market1501
from dml_tf.errors import UserError
from dml_tf.evaluation import reid

POOLINGS = ("mean", "max")


class ReidTask:
    """Market-1501: train on bounding_box_train, query/gallery retrieval at test time.

    Attributes:
      num_classes: training identities (751), or the labelled ones in semi-supervised runs.
      input_shape: (H, W, 3) after resizing.
      serving_shape: (None, None, 3): exported models resize any image size themselves.
    """

    headline_metrics = ("mAP", "rank1")  # printed after each evaluation

    def __init__(self, splits, image_size, multiquery_pooling="mean", labels=None):
        """Args:
          splits: `market1501.scan(root)`.
          image_size: (H, W) images are resized to.
          multiquery_pooling: "mean" or "max" of a query's gt_bbox features.
          labels: training class labels (−1: unlabelled); default: every identity relabelled.
        """
        if multiquery_pooling not in POOLINGS:
            raise UserError(f"--multiquery_pooling={multiquery_pooling} must be one of "
                            f"{', '.join(POOLINGS)}.")
        self.splits = splits
        self.image_size = tuple(image_size)
        self.multiquery_pooling = multiquery_pooling
        train = splits["train"]
        if labels is None:
            labels, _ = market1501.relabel(train.pids)
        self.labels = np.asarray(labels, np.int64)
        self.train_paths = train.paths
        self.num_classes = int(self.labels.max()) + 1
        self.input_shape = (*self.image_size, 3)
        self.serving_shape = (None, None, 3)
        self.num_train = len(self.train_paths)

    def train_dataset(self, batch_size, seed, views=1):
        if views != 1:
            raise UserError("--per_peer_augmentation is implemented for the CIFAR pipeline only; "
                            "drop it for Market-1501.")
        return market1501.train_dataset(self.train_paths, self.labels, batch_size, seed,
                                        image_size=self.image_size)

    def _features(self, cohort, split, batch_size):
        """Per-peer features of every image of `split`: a list of K [N, D] arrays."""
        per_peer = None
        ds = market1501.eval_dataset(self.splits[split].paths, batch_size, self.image_size)
        for images in tasks.diagnosed(self, ds):
            batch = cohort.predict_features(images)
            per_peer = per_peer or [[] for _ in batch]
            for k, f in enumerate(batch):
                per_peer[k].append(f.numpy())
        return [np.concatenate(f) for f in per_peer]

    def evaluate(self, cohort, batch_size):
        """mAP and CMC rank-1/5/10, single- and (where gt_bbox exists) multi-query.

        Keys: test/peer{k}/{mAP,rank1,rank5,rank10}, test/mean/... (the average of the peers'
        scores, paper Table 3), test/ensemble/... (concatenated normalised features, Fig. 3b),
        and the same with an "mq_" prefix for multi-query.
        """
        q, g = self.splits["query"], self.splits["gallery"]
        query = self._features(cohort, "query", batch_size)
        gallery = self._features(cohort, "gallery", batch_size)
        modes = {"": query}
        if "multiquery" in self.splits:
            mq = self.splits["multiquery"]
            mq_features = self._features(cohort, "multiquery", batch_size)
            modes["mq_"] = [
                reid.multi_query_features(q.pids, q.camids, reid.l2_normalize(m), mq.pids,
                                          mq.camids, pooling=self.multiquery_pooling,
                                          query_features=reid.l2_normalize(f))
                for m, f in zip(mq_features, query)]
        metrics = {}
        for prefix, queries in modes.items():
            scores = [reid.evaluate_features(qf, gf, q.pids, g.pids, q.camids, g.camids)
                      for qf, gf in zip(queries, gallery)]
            for k, peer_scores in enumerate(scores, start=1):
                for name, value in peer_scores.items():
                    metrics[f"test/peer{k}/{prefix}{name}"] = value
            for name in scores[0]:
                metrics[f"test/mean/{prefix}{name}"] = float(np.mean([s[name] for s in scores]))
            joint = reid.evaluate_features(
                np.concatenate([reid.l2_normalize(f) for f in queries], axis=1),
                np.concatenate([reid.l2_normalize(f) for f in gallery], axis=1),
                q.pids, g.pids, q.camids, g.camids)
            for name, value in joint.items():
                metrics[f"test/ensemble/{prefix}{name}"] = value
        return metrics

    def preprocess(self, images):
        """uint8 images of any size -> resized, [−1, 1] network inputs (as in training)."""
        return market1501.preprocess(images, self.image_size)

    def export_sample(self, n=8):
        paths = self.splits["query"].paths[:n]
        images = [tf.image.resize(market1501.decode(p), (128, 64)) for p in paths]
        return tf.cast(tf.round(tf.stack(images)), tf.uint8)

    def semi_supervised(self, mode, config):
        """Paper Sec. 4.10: the first `config.labelled_ids` identities (sorted) are labelled."""
        if mode == "none" or not config.labelled_ids:
            if mode != "none":
                raise UserError(f"--semi_supervised={mode} on Market-1501 needs --labelled_ids=M "
                                f"(the first M of the {self.num_classes} training identities).")
            return self
        if not 0 < config.labelled_ids <= self.num_classes:
            raise UserError(f"--labelled_ids must be in 1..{self.num_classes}, got "
                            f"{config.labelled_ids}.")
        labelled = self.labels < config.labelled_ids
        if mode == "labelled_only":
            splits = dict(self.splits)
            train = splits["train"]
            splits["train"] = market1501.Split(train.paths[labelled], train.pids[labelled],
                                               train.camids[labelled])
            return ReidTask(splits, self.image_size, self.multiquery_pooling,
                            labels=self.labels[labelled])
        return ReidTask(self.splits, self.image_size, self.multiquery_pooling,
                        labels=np.where(labelled, self.labels, -1))

    def diagnose(self, error):
        """Names the unreadable image behind a tf.data decode error (TensorFlow's own message
        does not); raises UserError when one is found, returns otherwise."""
        del error
        for split in self.splits.values():
            market1501.check_images(split.paths)

    def as_image_data(self, max_train=2000, max_test=1000, seed=0):
        """A seeded subset as an ImageData, for the analysis of a trained cohort (paper Sec. 4.8,
        Fig. 5): training crops with their class labels, and query crops labelled by identity
        (the t-SNE colours). Images are decoded and resized to the network input; mean and std
        127.5 make the classification pipeline's normalisation equal to this task's [−1, 1].
        """
        rng = np.random.default_rng(seed)

        def load(paths, labels, limit):
            keep = np.sort(rng.choice(len(paths), size=min(limit, len(paths)), replace=False))
            images = [tf.cast(tf.round(tf.image.resize(market1501.decode(p), self.image_size)),
                              tf.uint8).numpy() for p in paths[keep]]
            return np.stack(images), np.asarray(labels, np.int64)[keep]

        labelled = self.labels >= 0
        x_train, y_train = load(self.train_paths[labelled], self.labels[labelled], max_train)
        x_test, y_test = load(self.splits["query"].paths, self.splits["query"].pids, max_test)
        # Query identities are not training classes (re-ID tests on unseen people).
        return data_lib.ImageData.from_arrays(
            x_train, y_train, x_test, y_test, name="market1501", source=None,
            num_classes=self.num_classes, mean=(127.5,) * 3, std=(127.5,) * 3,
            horizontal_flip=True, test_labels_are_classes=False)

    def split_validation(self, fraction, seed):
        raise UserError("Methods that estimate on a validation split (kdcl_general) run on the "
                        "classification datasets; pick another --method for Market-1501.")


def market_task(config):
    if not config.data_dir:
        raise UserError("Market-1501 cannot be downloaded automatically: pass --data_dir at the "
                        "extracted Market-1501-v15.09.15 folder.")
    return ReidTask(market1501.scan(config.data_dir), config.image_size or (224, 224),
                    config.multiquery_pooling)
