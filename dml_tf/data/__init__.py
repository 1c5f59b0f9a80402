"""Image-classification data: in-memory arrays plus the statistics to normalise them.

`load(dataset, ...)` returns an `ImageData`; `dml_tf.data.pipeline` turns its arrays into
`tf.data` pipelines (augmentation, normalisation, batching).

Every source is checked where its arrays enter (`ImageData.from_arrays`, and an
`ImageData` built directly): labels that cannot be classes, images whose shapes differ
between splits, empty splits and constant channels stop with one sentence naming the file
(or the argument) and the first offending index and value, before any training. A label
out of range would otherwise train silently: its cross-entropy is 0 and `tf.one_hot` of it
is all zeros.
"""

import dataclasses
import math
import zipfile

import numpy as np

from dml_tf.errors import UserError

DATASETS = ("cifar10", "cifar100", "digits", "npz")
UNLABELLED = -1  # a semi-supervised training label: no cross-entropy, mimicry only


def _subject(source, argument):
    """`argument`, or `source: argument` when the arrays came from a file."""
    return f"{source}: {argument}" if source else argument


def _number(value):
    """A label value as written: 3 for 3 and 3.0, 2.5 for 2.5, 1e+300 for 1e300."""
    value = value.item() if isinstance(value, np.generic) else value
    exact = isinstance(value, float) and value.is_integer() and abs(value) <= 2 ** 53
    return int(value) if exact else value


def _check_images(x_train, x_test, source):
    """uint8 [N, H, W, 3] images, non-empty, of the same (H, W, C) in both splits."""
    for argument, x in (("x_train", x_train), ("x_test", x_test)):
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise UserError(f"{_subject(source, argument)} must be uint8 images [N, H, W, 3], "
                            f"got {got}.")
        if not len(x):
            raise UserError(f"{_subject(source, argument)} holds no images; every split needs "
                            f"at least one.")
    if x_test.shape[1:] != x_train.shape[1:]:
        test_size, train_size = ("x".join(map(str, x.shape[1:])) for x in (x_test, x_train))
        raise UserError(f"{_subject(source, 'x_test')}[0] is {test_size} (H x W x C) but x_train "
                        f"images are {train_size}; both splits need one image size.")


def _integer_labels(labels, count, argument, source):
    """Flat labels, one per image, of an integer dtype or whole-valued floats (not cast yet)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    name = _subject(source, argument)
    if labels.ndim != 1:
        raise UserError(f"{name} must be labels of shape [N] or [N, 1], got shape "
                        f"{labels.shape}.")
    if len(labels) != count:
        raise UserError(f"{name} has {len(labels)} labels for {count} images in "
                        f"x_{argument[2:]}; give one label per image.")
    if np.issubdtype(labels.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if bad.size:
            raise UserError(f"{name}[{bad[0]}] is {_number(labels[bad[0]])}, not a whole "
                            f"number; labels must be integer class indices.")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{name} must hold integer class indices, got dtype {labels.dtype}.")
    return labels


def _check_range(labels, num_classes, argument, source, allow_unlabelled=False):
    outside = (labels < 0) | (labels >= num_classes)
    if allow_unlabelled:
        outside &= labels != UNLABELLED
    bad = np.flatnonzero(outside)
    if bad.size:
        raise UserError(f"{_subject(source, argument)}[{bad[0]}] is {_number(labels[bad[0]])}, "
                        f"outside the class indices 0..{num_classes - 1}; labels must satisfy "
                        f"0 <= label < num_classes={num_classes}.")


def _infer_num_classes(y_train, source):
    """max(y_train) + 1, refusing negative labels and class indices without an example."""
    bad = np.flatnonzero(y_train < 0)
    if bad.size:
        raise UserError(f"{_subject(source, 'y_train')}[{bad[0]}] is {_number(y_train[bad[0]])}; "
                        f"labels must be class indices 0, 1, 2, ...")
    top = int(np.argmax(y_train))
    num_classes = int(y_train[top]) + 1
    # Every class needs an example, so there are at most len(y_train) classes; refused before
    # the count of examples per class, whose array would have num_classes entries (8 TiB for
    # a label of 2^40).
    if num_classes > len(y_train):
        raise UserError(f"{_subject(source, 'y_train')}[{top}] is {_number(y_train[top])}, more "
                        f"classes than its {len(y_train)} examples can have; labels must be class "
                        f"indices 0..M-1 with M <= {len(y_train)} (every class needs an example), "
                        f"numbered consecutively from 0.")
    empty = np.flatnonzero(np.bincount(y_train.astype(np.int64), minlength=num_classes) == 0)
    if empty.size:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if empty.size > 10 else "")
        raise UserError(f"{_subject(source, 'y_train')} has no example of class "
                        f"{'index' if empty.size == 1 else 'indices'} {shown} (its labels run "
                        f"0..{num_classes - 1}), which would become classes that cannot be "
                        f"learned; number the classes consecutively from 0.")
    return num_classes


def _check_test_classes(y_train, y_test, source):
    """Every test label is a class the training set has examples of."""
    trained = np.unique(y_train[y_train >= 0])
    bad = np.flatnonzero(~np.isin(y_test, trained))
    if bad.size:
        value = _number(y_test[bad[0]])
        raise UserError(f"{_subject(source, 'y_test')}[{bad[0]}] is {value}, a class with no "
                        f"example in y_train; test only classes the training set has.")


def _check_stats(mean, std, source):
    """Three finite means and three finite, positive standard deviations."""
    for argument, values in (("mean", mean), ("std", std)):
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise UserError(f"{_subject(source, argument)} must be 3 finite per-channel values, "
                            f"got {tuple(values)}.")
    bad = [c for c, s in enumerate(std) if s <= 0]
    if bad:
        raise UserError(f"{_subject(source, 'x_train')} channel {bad[0]} is constant "
                        f"(std[{bad[0]}] = {std[bad[0]]}), so normalising it would divide by zero; "
                        f"check that the images were decoded into the right channels.")


def _checked_labels(x_train, y_train, x_test, y_test, num_classes, source, allow_unlabelled,
                    test_labels_are_classes):
    """The checks of `ImageData.from_arrays` on labels: (int64 y_train, y_test, num_classes)."""
    y_train = _integer_labels(y_train, len(x_train), "y_train", source)
    y_test = _integer_labels(y_test, len(x_test), "y_test", source)
    inferred = num_classes is None
    if inferred:
        num_classes = _infer_num_classes(y_train, source)
    elif not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or (
            num_classes < 1):
        raise UserError(f"{_subject(source, 'num_classes')} must be a positive int, got "
                        f"{num_classes!r}.")
    _check_range(y_train, num_classes, "y_train", source, allow_unlabelled)
    if test_labels_are_classes:
        if not inferred:  # else any test label out of range is also one without training data
            _check_range(y_test, num_classes, "y_test", source)
        _check_test_classes(y_train, y_test, source)
    else:
        bad = np.flatnonzero(y_test < 0)
        if bad.size:
            raise UserError(f"{_subject(source, 'y_test')}[{bad[0]}] is "
                            f"{_number(y_test[bad[0]])}; identities must be non-negative.")
    return y_train.astype(np.int64), y_test.astype(np.int64), int(num_classes)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value.
class ImageData:
    """A labelled image-classification dataset held in memory.

    Built directly, it checks its arguments and names the offending one (`y_train`,
    `x_test`, ...) with the first bad index and value; labels of shape [N, 1], of another
    integer dtype or whole-valued floats are cast to int64 [N]. Loaders build it with
    `from_arrays`, which names their file instead.

    Attributes:
        x_train: uint8 images [N, H, W, 3], N >= 1.
        y_train: int64 labels [N] in [0, num_classes).
        x_test: uint8 images [M, H, W, 3], M >= 1, the same H, W as `x_train`.
        y_test: int64 labels [M], each a class `y_train` has examples of.
        num_classes: number of classes.
        mean: per-channel mean of `x_train`, 3 floats in pixel units (0..255).
        std: per-channel standard deviation (population, ddof=0) of `x_train`, pixel units,
            each > 0.
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
        _check_images(self.x_train, self.x_test, None)
        y_train, y_test, _ = _checked_labels(self.x_train, self.y_train, self.x_test, self.y_test,
                                             self.num_classes, None, False, True)
        _check_stats(self.mean, self.std, None)
        object.__setattr__(self, "y_train", y_train)
        object.__setattr__(self, "y_test", y_test)

    @classmethod
    def from_arrays(cls, x_train, y_train, x_test, y_test, *, name, source, num_classes=None,
                    mean=None, std=None, horizontal_flip=True, allow_unlabelled=False,
                    test_labels_are_classes=True):
        """Checks arrays read from `source` and builds their `ImageData`.

        The checks are the constructor's; their messages name `source` (a file or folder).

        Args:
            x_train, y_train, x_test, y_test: the arrays as read; labels of any integer dtype
                or whole-valued floats, shape [N] or [N, 1].
            name: the dataset name.
            source: what the arrays were read from, named in every message, e.g. a path.
            num_classes: the class count; None infers max(y_train) + 1 and refuses class
                indices below it without a training example.
            mean, std: per-channel statistics; None computes them from `x_train`.
            horizontal_flip: see the class.
            allow_unlabelled: whether `y_train` may mark examples `UNLABELLED` (-1), as
                semi-supervised training sets do.
            test_labels_are_classes: False when `y_test` holds identities rather than classes
                (re-identification queries, for analysis): then only non-negative integers.

        Returns:
            An `ImageData` with int64 [N] labels.

        Raises:
            UserError: any check fails; one sentence naming `source`, the array, and the first
                offending index and value.
        """
        _check_images(x_train, x_test, source)
        y_train, y_test, num_classes = _checked_labels(
            x_train, y_train, x_test, y_test, num_classes, source, allow_unlabelled,
            test_labels_are_classes)
        if mean is None or std is None:
            mean, std = channel_stats(x_train)
        _check_stats(mean, std, source)
        # Checked above, with the allowances the constructor does not make: set the fields
        # without running __post_init__ again.
        values = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                      num_classes=num_classes, mean=tuple(mean), std=tuple(std), name=name,
                      horizontal_flip=horizontal_flip)
        data = object.__new__(cls)
        for field in dataclasses.fields(cls):
            object.__setattr__(data, field.name, values[field.name])
        return data


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
    """Loads images and labels from a NumPy .npz file.

    E.g. the real CIFAR-10 subset cifar10_subset_train4000_test1000.npz. The file holds uint8 `x_train` / `x_test` [N, H, W, 3] of one image size and integer
    (or whole-valued float) `y_train` / `y_test` [N] or [N, 1]. The classes are
    0..max(y_train), each with training examples; every test label is one of them.
    Loaded with allow_pickle=False: an .npz from elsewhere cannot run code.

    Raises:
        UserError: the file is missing, not such an .npz, or fails a check of
            `ImageData.from_arrays`; the message names the file.
    """
    if not path:
        raise UserError("--dataset=npz needs --data_dir at a .npz file with x_train, y_train, "
                        "x_test and y_test.")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except FileNotFoundError:
        raise UserError(f"--data_dir={path} does not exist; point it at the .npz file.") from None
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not an .npz with uint8 x_train/x_test and integer "
                        f"y_train/y_test ({e}).") from None
    return ImageData.from_arrays(**arrays, name="npz", source=path)
