"""What the training loop needs from a dataset, whatever the dataset.

A task knows its data and its evaluation protocol: classification (CIFAR, digits, .npz,
ImageNet) reports top-k accuracy; re-identification (Market-1501) reports retrieval
metrics of the "features" embedding. train_lib drives any task the same way.
"""

import pkgutil

import numpy as np
import tensorflow as tf

from dml_tf import data as data_lib
from dml_tf.data import pipeline
from dml_tf.errors import UserError
from dml_tf.evaluation import classification


class ClassificationTask:
    """Image classification on in-memory uint8 arrays (an `ImageData`).

    Attributes:
      num_classes: number of classes.
      input_shape: (H, W, C) of the network inputs.
      num_train: training-set size.
      serving_shape: (H, W, C) of the uint8 images a SavedModel takes.
    """

    headline_metrics = ("top1",)  # printed after each evaluation

    def __init__(self, data, *, allow_unlabelled=False):
        """Args:
          data: an `ImageData` (checked when it was built: labels, image sizes, statistics).
          allow_unlabelled: whether `data.y_train` may mark examples `UNLABELLED` (-1); only
            the semi-supervised "dml_all" task does, whose loop masks their cross-entropy.
            Anywhere else such a label would train silently with a cross-entropy of 0.
        """
        if not isinstance(data, data_lib.ImageData):
            raise UserError(f"data must be a dml_tf.data.ImageData, got {type(data).__name__}.")
        unlabelled = np.flatnonzero(data.y_train == data_lib.UNLABELLED)
        if unlabelled.size and not allow_unlabelled:
            raise UserError(f"y_train[{unlabelled[0]}] is {data_lib.UNLABELLED} (unlabelled), "
                            f"which only the semi-supervised dml_all task trains on; give every "
                            f"example a class in 0..{data.num_classes - 1}.")
        height, width = data.x_train.shape[1:3]
        if min(height, width) <= pipeline.PADDING:
            raise UserError(f"x_train images are {height}x{width}, but the training "
                            f"augmentation's {pipeline.PADDING}-pixel reflection padding needs "
                            f"more than {pipeline.PADDING} pixels per side; use larger images.")
        self.data = data
        self.num_classes = data.num_classes
        self.input_shape = tuple(data.x_train.shape[1:])
        self.serving_shape = self.input_shape
        self.num_train = len(data.x_train)

    def train_dataset(self, batch_size, seed, views=1):
        """Shuffled, augmented, normalised full batches of (images, labels); see pipeline."""
        d = self.data
        return pipeline.train_dataset(d.x_train, d.y_train, d.mean, d.std, batch_size, seed=seed,
                                      flip=d.horizontal_flip, views=views)

    def evaluate(self, cohort, batch_size):
        """Test top-1/top-5 per peer, mean of peers and ensemble (classification.cohort_metrics)."""
        d = self.data
        ds = pipeline.eval_dataset(d.x_test, d.y_test, d.mean, d.std, batch_size)
        probs, labels = classification.collect_probabilities(cohort.predict, ds)
        return classification.cohort_metrics(probs, labels, prefix="test")

    def preprocess(self, images):
        """uint8 images -> network inputs (the pipeline's normalisation), for serving."""
        return pipeline.normalize(images, self.data.mean, self.data.std)

    def export_sample(self, n=8):
        """A few uint8 test images to check exported SavedModels against the cohort."""
        return tf.constant(self.data.x_test[:n])

    def _with_train(self, x_train, y_train, allow_unlabelled=False):
        d = self.data
        data = data_lib.ImageData.from_arrays(
            x_train, y_train, d.x_test, d.y_test, name=d.name, source=None,
            num_classes=d.num_classes, mean=d.mean, std=d.std, horizontal_flip=d.horizontal_flip,
            allow_unlabelled=allow_unlabelled)
        return ClassificationTask(data, allow_unlabelled=allow_unlabelled)

    def semi_supervised(self, mode, config):
        """The task for a semi-supervised mode (paper Sec. 3.4, 4.10).

        A seeded `config.labelled_fraction` of every class keeps its label. "labelled_only"
        drops the other examples; "dml_all" keeps them with label −1 (the loop masks their
        cross-entropy). Normalisation statistics stay those of the whole training set.
        """
        if mode == "none":
            return self
        labelled = labelled_per_class(self.data.y_train, config.labelled_fraction, config.seed)
        if mode == "labelled_only":
            return self._with_train(self.data.x_train[labelled], self.data.y_train[labelled])
        return self._with_train(self.data.x_train,
                                np.where(labelled, self.data.y_train, data_lib.UNLABELLED),
                                allow_unlabelled=True)

    def split_validation(self, fraction, seed):
        """(task on the rest, (uint8 images, labels) held out): a seeded per-class split."""
        d = self.data
        held_out = labelled_per_class(d.y_train, fraction, seed + 1)
        kept = np.bincount(d.y_train[~held_out & (d.y_train >= 0)], minlength=d.num_classes)
        emptied = np.flatnonzero((kept == 0) & np.isin(np.arange(d.num_classes), d.y_train))
        if emptied.size:
            raise UserError(f"fraction={fraction} holds out every training example of class "
                            f"{emptied[0]} (it has {int((d.y_train == emptied[0]).sum())} in "
                            f"y_train), leaving it nothing to train on; lower fraction (one example "
                            f"of every class is always held out) or give that class more.")
        return self._with_train(d.x_train[~held_out], d.y_train[~held_out]), (
            d.x_train[held_out], d.y_train[held_out])

    def predict_probabilities(self, cohort, images, labels, batch_size):
        """Per-peer probabilities on held-out uint8 images: (list of K [N, M], labels)."""
        d = self.data
        ds = pipeline.eval_dataset(images, labels, d.mean, d.std, batch_size)
        return classification.collect_probabilities(cohort.predict, ds)


def labelled_per_class(labels, fraction, seed):
    """Boolean mask choosing round(fraction·n_c) examples (at least 1) of every class c, seeded."""
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(labels), bool)
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        count = max(1, int(round(fraction * len(members))))
        chosen[rng.choice(members, size=count, replace=False)] = True
    return chosen


def classification_task(config):
    """The ClassificationTask of config.dataset (cifar10, cifar100, digits, npz)."""
    return ClassificationTask(data_lib.load(config.dataset, data_dir=config.data_dir,
                                            tfds_data_dir=config.tfds_data_dir, seed=config.seed))


def diagnosed(task, dataset):
    """Iterates `dataset`; a decode error becomes the task's one-sentence diagnosis if it has one."""
    iterator = iter(dataset)
    while True:
        try:
            element = next(iterator)
        except StopIteration:
            return
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
            if hasattr(task, "diagnose"):
                task.diagnose(e)
            raise
        yield element


# Dataset name -> "module:function" making its task from a Config: one table, as for methods
# and networks; a task's module (Market-1501's, ImageNet's) is imported only when asked for.
_FACTORIES = {name: "dml_tf.tasks:classification_task" for name in data_lib.DATASETS} | {
    "market1501": "dml_tf.reid_task:market_task",
    "imagenet": "dml_tf.imagenet_task:imagenet_task",
}


def register(dataset, factory):
    """Makes `factory(config) -> task` (or its "module:function") the task of `dataset`."""
    _FACTORIES[dataset] = factory


def make(config):
    """The task of config.dataset."""
    if config.dataset not in _FACTORIES:
        raise UserError(f"--dataset={config.dataset} is not known; choose one of "
                        f"{', '.join(sorted(_FACTORIES))}.")
    factory = _FACTORIES[config.dataset]
    return (pkgutil.resolve_name(factory) if isinstance(factory, str) else factory)(config)
