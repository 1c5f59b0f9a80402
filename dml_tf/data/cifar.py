"""CIFAR-10 / CIFAR-100: the original binary files, or tensorflow-datasets.

Binary version layout (https://www.cs.toronto.edu/~kriz/cifar.html):
  cifar-10-batches-bin/data_batch_{1..5}.bin, test_batch.bin:
      records of <1 label byte><3072 pixel bytes>
  cifar-100-binary/train.bin, test.bin:
      records of <1 coarse label byte><1 fine label byte><3072 pixel bytes>
The 3072 pixel bytes are three 32x32 planes (red, green, blue), each row-major.
"""

import os
import socket
import threading
import time

import numpy as np

from dml_tf.data import ImageData
from dml_tf.errors import UserError

HEIGHT = WIDTH = 32
_PIXELS = 3 * HEIGHT * WIDTH


class _Layout:
    """Where one dataset's binary files live and how a record is laid out."""

    def __init__(self, title, folder, files, label_bytes, num_classes, num_coarse=None):
        self.title = title
        self.folder = folder
        self.files = files
        self.label_bytes = label_bytes
        self.num_classes = num_classes
        self.num_coarse = num_coarse

    @property
    def record_bytes(self):
        return self.label_bytes + _PIXELS


_LAYOUTS = {
    "cifar10": _Layout(
        "CIFAR-10", "cifar-10-batches-bin",
        {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
        label_bytes=1, num_classes=10),
    "cifar100": _Layout(
        "CIFAR-100", "cifar-100-binary",
        {"train": ["train.bin"], "test": ["test.bin"]},
        label_bytes=2, num_classes=100, num_coarse=20),
}

# tensorflow-datasets first looks for a prepared copy on Google Cloud Storage, then
# downloads the archive from the dataset's home page; either host will do.
_GCS_HOST = ("storage.googleapis.com", 443)
_ORIGIN_HOST = ("www.cs.toronto.edu", 443)
_PROBE_TIMEOUT_S = 5.0


def _layout(dataset):
    if dataset not in _LAYOUTS:
        raise UserError(f"--dataset={dataset!r} is not a CIFAR dataset; "
                        f"choose one of {', '.join(_LAYOUTS)}.")
    return _LAYOUTS[dataset]


def _where_to_point(layout):
    return (f"pass --data_dir at the extracted {layout.folder} folder of the binary version "
            f"(or its parent), or omit --data_dir to use tensorflow-datasets")


def _read_file(path, layout):
    """Decodes one binary file into (uint8 [N,32,32,3], int64 [N] fine labels)."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw or len(raw) % layout.record_bytes:
        raise UserError(f"{path} has {len(raw)} bytes, not a whole number (>= 1) of "
                        f"{layout.record_bytes}-byte {layout.title} records; the file is "
                        f"truncated or not {layout.title} binary data: re-extract the archive.")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, layout.record_bytes)
    # The fine label is the last label byte (CIFAR-100 puts the coarse label first).
    labels = records[:, layout.label_bytes - 1].astype(np.int64)
    checks = [(labels, layout.num_classes, "label")]
    if layout.num_coarse:
        checks.append((records[:, 0], layout.num_coarse, "coarse label"))
    for values, limit, what in checks:
        bad = np.flatnonzero(values >= limit)
        if bad.size:
            raise UserError(f"{path} has {what} {int(values[bad[0]])} in record {int(bad[0])}, "
                            f"but {layout.title} {what}s are 0..{limit - 1}; the file is not "
                            f"{layout.title} binary data: {_where_to_point(layout)}.")
    # Channel planes -> HWC; the copy makes the array contiguous for tf.data.
    images = records[:, layout.label_bytes:].reshape(-1, 3, HEIGHT, WIDTH)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels


def load_binary(path, dataset, split):
    """Reads CIFAR from the original binary-version files, without pickle.

    Args:
        path: the extracted `cifar-10-batches-bin` / `cifar-100-binary` folder, or the
            folder that contains it.
        dataset: "cifar10" or "cifar100".
        split: "train" or "test".

    Returns:
        (images, labels): uint8 [N, 32, 32, 3] (HWC, RGB) and int64 [N]; CIFAR-100 returns
        the fine (100-class) label.

    Raises:
        UserError: missing folder or file, truncated file, or labels out of range.
    """
    layout = _layout(dataset)
    if split not in layout.files:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a folder; {_where_to_point(layout)}.")
    nested = os.path.join(path, layout.folder)
    root = nested if os.path.isdir(nested) else path
    images, labels = [], []
    for name in layout.files[split]:
        file = os.path.join(root, name)
        if not os.path.isfile(file):
            raise UserError(f"{file} is missing; {_where_to_point(layout)}.")
        x, y = _read_file(file, layout)
        images.append(x)
        labels.append(y)
    if len(images) == 1:
        return images[0], labels[0]
    return np.concatenate(images), np.concatenate(labels)


def _reachable(addresses, timeout=None):
    """Which of `addresses` ((host, port) pairs) accept a TCP connection within `timeout` s.

    Each attempt runs in its own daemon thread, all at once, because name resolution
    ignores socket timeouts: a resolver that hangs must not hang the caller.

    Args:
        addresses: (host, port) pairs.
        timeout: seconds for all of them together; None: `_PROBE_TIMEOUT_S`.

    Returns:
        A list of bools, one per address.
    """
    timeout = _PROBE_TIMEOUT_S if timeout is None else timeout
    opened = [False] * len(addresses)

    def connect(i):
        try:
            with socket.create_connection(addresses[i], timeout=timeout):
                opened[i] = True
        except OSError:
            pass

    threads = [threading.Thread(target=connect, args=(i,), daemon=True)
               for i in range(len(addresses))]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return list(opened)


def _as_arrays(builder, split):
    """Reads a whole tfds split into numpy arrays.

    Batches of 4096 rather than `batch_size=-1`: the latter batches by the split size
    recorded in the dataset info, which `tfds.testing.mock_data` leaves unknown (it then
    asks for a batch of sys.maxsize and aborts the process).
    """
    import tensorflow_datasets as tfds

    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    images, labels = [], []
    for x, y in tfds.as_numpy(dataset.batch(4096)):
        images.append(x)
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_tfds(dataset, data_dir=None):
    """Loads CIFAR through tensorflow-datasets, downloading it only when it is not prepared.

    A prepared copy in `data_dir` is read offline. Otherwise the download hosts are probed
    for a few seconds first, so that a machine without network gets one clear error at once
    instead of minutes of tensorflow-datasets retries.

    Args:
        dataset: "cifar10" or "cifar100".
        data_dir: tensorflow-datasets data dir; None uses its default (~/tensorflow_datasets).

    Returns:
        ((x_train, y_train), (x_test, y_test)): uint8 [N,32,32,3] and int64 [N] arrays.

    Raises:
        UserError: the data is not prepared and cannot be downloaded.
    """
    layout = _layout(dataset)
    # Imported here: it takes seconds, and readers of the binary files never need it.
    import tensorflow_datasets as tfds

    builder = tfds.builder(dataset, data_dir=data_dir)
    try:
        # Reading first (rather than asking is_prepared()) lets whatever tfds can already
        # serve, a prepared copy or tfds.testing.mock_data, load without any network.
        return _as_arrays(builder, "train"), _as_arrays(builder, "test")
    except AssertionError:
        # tfds signals "not downloaded and prepared" with an AssertionError.
        if builder.is_prepared():
            raise
    gcs, origin = _reachable([_GCS_HOST, _ORIGIN_HOST])
    if not (gcs or origin):
        raise UserError(
            f"{layout.title} is not prepared in the tensorflow-datasets data dir "
            f"{builder.data_dir_root} and could not be downloaded (no network); pass --data_dir "
            f"at an extracted {layout.folder} folder, or prepare it with tensorflow-datasets on "
            f"a machine with network and pass that folder as --tfds_data_dir.")
    # Without the Cloud Storage host, tfds's look-up there would retry for minutes.
    config = tfds.download.DownloadConfig(try_download_gcs=gcs)
    try:
        builder.download_and_prepare(download_config=config)
    except (OSError, tfds.download.DownloadError) as err:
        raise UserError(
            f"Downloading {layout.title} with tensorflow-datasets failed "
            f"({type(err).__name__}: {str(err)[:200]}); pass --data_dir at an extracted "
            f"{layout.folder} folder instead.") from err
    return _as_arrays(builder, "train"), _as_arrays(builder, "test")


def load(dataset, data_dir=None, tfds_data_dir=None):
    """Loads CIFAR-10 or CIFAR-100: binary files when `data_dir` is given, else tfds.

    Args:
        dataset: "cifar10" or "cifar100".
        data_dir: the extracted binary-version folder or its parent, or None.
        tfds_data_dir: tensorflow-datasets data dir used when `data_dir` is None.

    Returns:
        An `ImageData` whose mean/std come from the training images.

    Raises:
        UserError: missing or malformed files, or labels, image sizes or channels that fail
            `ImageData.from_arrays`' checks (a test class without training images, a
            constant channel); the message names `data_dir` or the tfds copy.
    """
    layout = _layout(dataset)
    if data_dir:
        train = load_binary(data_dir, dataset, "train")
        test = load_binary(data_dir, dataset, "test")
        source = os.fspath(data_dir)
    else:
        train, test = load_tfds(dataset, data_dir=tfds_data_dir)
        source = f"tensorflow-datasets {dataset} in {tfds_data_dir or 'its default data dir'}"
    return ImageData.from_arrays(*train, *test, num_classes=layout.num_classes, name=dataset,
                                 source=source)
