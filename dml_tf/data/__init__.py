"""Image-classification data: in-memory arrays plus the statistics to normalise them.

`load(dataset, ...)` returns an `ImageData`; `dml_tf.data.pipeline` turns its arrays into
`tf.data` pipelines (augmentation, normalisation, batching).
"""

import dataclasses
import math

import numpy as np

from dml_tf.errors import UserError

DATASETS = ("cifar10", "cifar100", "digits", "npz")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value.
class ImageData:
    """A labelled image-classification dataset held in memory.

    Attributes:
        x_train: uint8 images [N, H, W, 3].
        y_train: int64 labels [N] in [0, num_classes).
        x_test: uint8 images [M, H, W, 3].
        y_test: int64 labels [M].
        num_classes: number of classes.
        mean: per-channel mean of `x_train`, 3 floats in pixel units (0..255).
        std: per-channel standard deviation (population, ddof=0) of `x_train`, pixel units.
        name: the dataset name, e.g. "cifar100".
        horizontal_flip: whether mirrored images are valid training examples (CIFAR: yes;
            digits: no, a mirrored 3 is no longer a 3).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple
    std: tuple
    name: str
    horizontal_flip: bool = True

    def __post_init__(self):
        for split, x, y in (("train", self.x_train, self.y_train),
                            ("test", self.x_test, self.y_test)):
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"{self.name} x_{split} must be uint8 [N,H,W,3], "
                                 f"got {x.dtype} {x.shape}.")
            if y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name} y_{split} must be int64 [{x.shape[0]}], "
                                 f"got {y.dtype} {y.shape}.")


def channel_stats(images):
    """Exact per-channel mean and standard deviation of uint8 images.

    Counts every pixel value per channel (a 256-bin histogram) and takes the moments in
    exact integer arithmetic, rounding once to float64 at the end: no float copy of the
    images (1.2 GB for CIFAR's training set) and no accumulated rounding error.

    Args:
        images: uint8 array [..., C].

    Returns:
        (mean, std): tuples of C Python floats, pixel units, population std (ddof=0).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.size == 0:
        raise ValueError(f"channel_stats needs non-empty uint8 images, got {images.dtype} "
                         f"{images.shape}.")
    means, stds = [], []
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256).tolist()
        n = sum(counts)
        s1 = sum(k * v for v, k in enumerate(counts))
        s2 = sum(k * v * v for v, k in enumerate(counts))
        means.append(s1 / n)  # int / int: correctly rounded.
        stds.append(math.sqrt((n * s2 - s1 * s1) / (n * n)))  # exact variance, one rounding.
    return tuple(means), tuple(stds)


def load(dataset, data_dir=None, tfds_data_dir=None, seed=0):
    """Loads an image-classification dataset into memory.

    Args:
        dataset: "cifar10", "cifar100", "digits" or "npz".
        data_dir: CIFAR: the extracted binary-version folder (cifar-10-batches-bin /
            cifar-100-binary) or its parent; None loads through tensorflow-datasets.
            npz: the .npz file (see `load_npz`).
        tfds_data_dir: CIFAR only: tensorflow-datasets data dir (None: its default).
        seed: digits only: seed of the stratified train/test split.

    Returns:
        An `ImageData`.

    Raises:
        UserError: unknown dataset, or missing / malformed data.
    """
    # Imported here so that the offline digits quickstart never pays for importing
    # tensorflow-datasets, and CIFAR runs never import scikit-learn.
    if dataset in ("cifar10", "cifar100"):
        from dml_tf.data import cifar
        return cifar.load(dataset, data_dir=data_dir, tfds_data_dir=tfds_data_dir)
    if dataset == "digits":
        from dml_tf.data import digits
        return digits.load(seed=seed)
    if dataset == "npz":
        return load_npz(data_dir)
    raise UserError(f"--dataset={dataset!r} is not known; choose one of {', '.join(DATASETS)}.")


def load_npz(path):
    """Images in a NumPy .npz file: uint8 `x_train` / `x_test` [N, H, W, 3], integer `y_train` /
    `y_test` [N] (e.g. the real CIFAR-10 subset cifar10_subset_train4000_test1000.npz).

    Loaded with allow_pickle=False: an .npz from elsewhere cannot run code.
    """
    if not path:
        raise UserError("--dataset=npz needs --data_dir at a .npz file with x_train, y_train, "
                        "x_test and y_test.")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except FileNotFoundError:
        raise UserError(f"--data_dir={path} does not exist; point it at the .npz file.") from None
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"{path} is not an .npz with uint8 x_train/x_test and integer "
                        f"y_train/y_test ({e}).") from None
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise UserError(f"{path}: x_{split} must be uint8 [N, H, W, 3], got {x.dtype} {x.shape}.")
    y_train = arrays["y_train"].astype(np.int64).reshape(-1)
    y_test = arrays["y_test"].astype(np.int64).reshape(-1)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if min(y_train.min(), y_test.min()) < 0:
        raise UserError(f"{path}: labels must be non-negative class indices.")
    mean, std = channel_stats(arrays["x_train"])
    return ImageData(x_train=arrays["x_train"], y_train=y_train, x_test=arrays["x_test"],
                     y_test=y_test, num_classes=num_classes, mean=mean, std=std, name="npz")
