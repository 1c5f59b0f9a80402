"""CIFAR loaders: the original binary files (written here byte by byte) and tfds."""

import os
import random
import socket
import tempfile
import threading
import time

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import tensorflow_datasets as tfds

import dml_tf.data
from dml_tf.data import cifar
from dml_tf.errors import UserError

PLANE = 32 * 32


def pixel(record, y, x, c):
    """The value the test writes at row y, column x, channel c of record `record`."""
    return (record * 37 + c * 101 + y * 7 + x * 3) % 256


def record_bytes(record, labels):
    """One record: the label byte(s), then the R, G and B planes, each row-major."""
    pixels = bytes(pixel(record, y, x, c) for c in range(3) for y in range(32) for x in range(32))
    assert len(pixels) == 3 * PLANE
    return bytes(labels) + pixels


def expected_images(records):
    r, y, x, c = np.meshgrid(np.asarray(records), np.arange(32), np.arange(32), np.arange(3),
                             indexing="ij")
    return ((r * 37 + c * 101 + y * 7 + x * 3) % 256).astype(np.uint8)


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(records))
    return path


# CIFAR-10: five training files of 2, 1, 3, 1, 2 records and a test file of 3.
C10_TRAIN_COUNTS = (2, 1, 3, 1, 2)
C10_TRAIN_LABELS = [3, 9, 0, 1, 2, 7, 5, 8, 4]
C10_TEST_LABELS = [5, 0, 9]  # classes the training files have


@pytest.fixture
def cifar10_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    record = 0
    for i, count in enumerate(C10_TRAIN_COUNTS, start=1):
        records = []
        for _ in range(count):
            records.append(record_bytes(record, [C10_TRAIN_LABELS[record]]))
            record += 1
        write(folder / f"data_batch_{i}.bin", records)
    write(folder / "test_batch.bin",
          [record_bytes(100 + i, [label]) for i, label in enumerate(C10_TEST_LABELS)])
    return folder


# CIFAR-100: (coarse, fine) label pairs, the coarse label first in each record.
C100_TRAIN = [(4, 30), (19, 99), (0, 0), (11, 57)]
C100_TEST = [(11, 57), (19, 99)]  # fine classes the training file has


@pytest.fixture
def cifar100_dir(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    write(folder / "train.bin", [record_bytes(i, pair) for i, pair in enumerate(C100_TRAIN)])
    write(folder / "test.bin", [record_bytes(50 + i, pair) for i, pair in enumerate(C100_TEST)])
    return folder


def test_pixel_layout_is_planar():
    # The test's own writer: byte 1 + c*1024 + y*32 + x is pixel (y, x, c).
    data = record_bytes(5, [1])
    assert data[0] == 1
    assert data[1 + 2 * PLANE + 3 * 32 + 4] == pixel(5, 3, 4, 2)


@pytest.mark.parametrize("which", ["folder", "parent"])
def test_cifar10_binary_round_trip(cifar10_dir, which):
    path = cifar10_dir if which == "folder" else cifar10_dir.parent
    x, y = cifar.load_binary(path, "cifar10", "train")
    assert x.dtype == np.uint8 and x.shape == (9, 32, 32, 3) and x.flags.c_contiguous
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, C10_TRAIN_LABELS)
    np.testing.assert_array_equal(x, expected_images(range(9)))
    # Spot check against the byte formula directly: channel planes become the last axis.
    assert x[4, 10, 20, 1] == pixel(4, 10, 20, 1)
    x, y = cifar.load_binary(str(path), "cifar10", "test")
    np.testing.assert_array_equal(y, C10_TEST_LABELS)
    np.testing.assert_array_equal(x, expected_images([100, 101, 102]))


@pytest.mark.parametrize("which", ["folder", "parent"])
def test_cifar100_binary_returns_fine_labels(cifar100_dir, which):
    path = cifar100_dir if which == "folder" else cifar100_dir.parent
    x, y = cifar.load_binary(path, "cifar100", "train")
    np.testing.assert_array_equal(y, [fine for _, fine in C100_TRAIN])
    np.testing.assert_array_equal(x, expected_images(range(4)))
    x, y = cifar.load_binary(path, "cifar100", "test")
    np.testing.assert_array_equal(y, [57, 99])
    np.testing.assert_array_equal(x, expected_images([50, 51]))


def test_load_binary_builds_image_data(cifar100_dir):
    data = dml_tf.data.load("cifar100", data_dir=str(cifar100_dir.parent))
    assert data.name == "cifar100" and data.num_classes == 100
    assert data.x_train.shape == (4, 32, 32, 3) and data.x_test.shape == (2, 32, 32, 3)
    pixels = data.x_train.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(data.mean, pixels.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(data.std, pixels.std(axis=0), rtol=1e-10)


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="--data_dir") as err:
        cifar.load_binary(missing, "cifar10", "train")
    assert str(missing) in str(err.value)


def test_missing_file(cifar10_dir):
    (cifar10_dir / "data_batch_3.bin").unlink()
    with pytest.raises(UserError, match="--data_dir") as err:
        cifar.load_binary(cifar10_dir.parent, "cifar10", "train")
    assert str(cifar10_dir / "data_batch_3.bin") in str(err.value)
    # The test split does not need the missing training file.
    cifar.load_binary(cifar10_dir.parent, "cifar10", "test")


def test_wrong_dataset_folder(cifar100_dir):
    with pytest.raises(UserError, match="cifar-10-batches-bin"):
        cifar.load_binary(cifar100_dir.parent, "cifar10", "test")


@pytest.mark.parametrize("cut", [1, 3072, 3073 * 3])
def test_truncated_or_empty_file(cifar10_dir, cut):
    file = cifar10_dir / "test_batch.bin"
    file.write_bytes(file.read_bytes()[:-cut])
    with pytest.raises(UserError) as err:
        cifar.load_binary(cifar10_dir, "cifar10", "test")
    assert str(file) in str(err.value)


def test_cifar10_label_out_of_range(cifar10_dir):
    file = write(cifar10_dir / "test_batch.bin", [record_bytes(0, [9]), record_bytes(1, [10])])
    with pytest.raises(UserError, match="record 1") as err:
        cifar.load_binary(cifar10_dir, "cifar10", "test")
    assert str(file) in str(err.value)


@pytest.mark.parametrize("labels", [(3, 100), (20, 5)])
def test_cifar100_label_out_of_range(cifar100_dir, labels):
    file = write(cifar100_dir / "test.bin", [record_bytes(0, labels)])
    with pytest.raises(UserError) as err:
        cifar.load_binary(cifar100_dir, "cifar100", "test")
    assert str(file) in str(err.value)


def test_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="--dataset"):
        cifar.load_binary(tmp_path, "cifar1000", "train")


def decode_cifar10(data):
    """An independent, pure-Python reading of a CIFAR-10 binary file; None if invalid."""
    size = 1 + 3 * PLANE
    if not data or len(data) % size:
        return None
    images, labels = [], []
    for start in range(0, len(data), size):
        record = data[start:start + size]
        if record[0] >= 10:
            return None
        labels.append(record[0])
        images.append([[[record[1 + c * PLANE + y * 32 + x] for c in range(3)]
                        for x in range(32)] for y in range(32)])
    return images, labels


@st.composite
def cifar10_files(draw):
    """Byte strings: arbitrary, whole records (labels sometimes >= 10), or records + a tail."""
    kind = draw(st.sampled_from(["raw", "records", "records_and_tail"]))
    if kind == "raw":
        return draw(st.binary(max_size=3 * 3073 + 5))
    records = draw(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 2**32 - 1)),
                            max_size=3))
    data = b"".join(bytes([label]) + random.Random(seed).randbytes(3 * PLANE)
                    for label, seed in records)
    if kind == "records_and_tail":
        data += draw(st.binary(min_size=1, max_size=3074))
    return data


# derandomize: the same examples every run (deterministic suite); no example database on disk.
@hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None)
@hypothesis.given(cifar10_files())
def test_any_bytes_decode_exactly_or_raise_user_error(data):
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "test_batch.bin"), "wb") as f:
            f.write(data)
        expected = decode_cifar10(data)
        try:
            x, y = cifar.load_binary(folder, "cifar10", "test")
        except UserError:
            assert expected is None
            return
    assert expected is not None
    np.testing.assert_array_equal(x, np.array(expected[0], dtype=np.uint8).reshape(x.shape))
    assert x.shape == (len(expected[1]), 32, 32, 3)
    np.testing.assert_array_equal(y, expected[1])


# tensorflow-datasets.

def no_probe(*args, **kwargs):
    raise AssertionError("the network probe must not run when tfds can serve the data")


@pytest.fixture
def no_network(monkeypatch):
    """Fails the test on any outgoing connection (the loader's or tensorflow-datasets')."""
    def connect(self, address, *args):
        raise AssertionError(f"network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)


@pytest.mark.parametrize("dataset,classes", [("cifar10", 10), ("cifar100", 100)])
def test_tfds_under_mock_data(tmp_path, monkeypatch, no_network, dataset, classes):
    monkeypatch.setattr(cifar, "_reachable", no_probe)
    with tfds.testing.mock_data(num_examples=7):
        (x_train, y_train), (x_test, y_test) = cifar.load_tfds(dataset, data_dir=str(tmp_path))
        data = dml_tf.data.load(dataset, tfds_data_dir=str(tmp_path))
    for x, y in ((x_train, y_train), (x_test, y_test)):
        assert x.shape == (7, 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (7,) and y.dtype == np.int64
        assert y.min() >= 0 and y.max() < classes
    assert data.num_classes == classes and data.name == dataset
    assert data.x_train.shape == (7, 32, 32, 3) and len(data.mean) == 3


@pytest.fixture
def closed_port():
    """A loopback port that refuses connections (bound, never listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()


def test_tfds_without_network_fails_fast(tmp_path, monkeypatch, closed_port):
    # Both download hosts point at a refusing loopback port: the real probe, no network.
    monkeypatch.setattr(cifar, "_GCS_HOST", closed_port)
    monkeypatch.setattr(cifar, "_ORIGIN_HOST", closed_port)
    start = time.monotonic()
    with pytest.raises(UserError, match="--data_dir") as err:
        cifar.load_tfds("cifar100", data_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    assert "cifar-100-binary" in str(err.value) and "could not be downloaded" in str(err.value)


def test_tfds_without_network_never_downloads(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable")

    def download(*args, **kwargs):
        raise AssertionError("download_and_prepare must not run without network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download)
    with pytest.raises(UserError, match="--data_dir"):
        dml_tf.data.load("cifar10", tfds_data_dir=str(tmp_path))


def test_probe_is_bounded_when_resolution_hangs(monkeypatch):
    released = threading.Event()

    def hang(*args, **kwargs):
        # A resolver that hangs, then fails as a real one would once released.
        released.wait(30)
        raise OSError("name resolution timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    try:
        assert cifar._reachable([("example.invalid", 443)] * 2, timeout=0.3) == [False, False]
        assert time.monotonic() - start < 2
    finally:
        released.set()


def test_probe_sees_a_listening_host(closed_port):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert cifar._reachable([server.getsockname(), closed_port], timeout=3) == [True, False]


def sorted_records(x, y):
    """Examples in a canonical order (tfds shuffles them when it prepares a split)."""
    keys = [bytes([label]) + image.tobytes() for image, label in zip(x, y)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return x[order], y[order]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_tfds_prepares_from_the_archive_then_loads_offline(
        tmp_path, monkeypatch, no_network, cifar10_dir, cifar100_dir, dataset):
    """The real tfds path: prepare from the (tiny) extracted archive, then read it offline.

    Only the download itself is replaced: tfds "downloads and extracts" to the folder this
    test wrote, parses it with its own CIFAR code and writes a prepared copy.
    """
    (cifar10_dir / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    (cifar100_dir / "coarse_label_names.txt").write_text("\n".join(f"k{i}" for i in range(20)))
    (cifar100_dir / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)))
    archive_root = str(cifar10_dir.parent)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                        lambda self, url: archive_root)
    # Only the origin host "answers": tfds must not look for a copy on Cloud Storage.
    monkeypatch.setattr(cifar, "_reachable", lambda addresses: [False, True])
    tfds_dir = str(tmp_path / "tfds")
    prepared = cifar.load_tfds(dataset, data_dir=tfds_dir)

    monkeypatch.setattr(cifar, "_reachable", no_probe)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", no_probe)
    offline = cifar.load_tfds(dataset, data_dir=tfds_dir)
    for split, (x, y), (x_again, y_again) in zip(("train", "test"), prepared, offline):
        np.testing.assert_array_equal(x, x_again)
        np.testing.assert_array_equal(y, y_again)
        # tfds's own parser and ours agree on every pixel and label.
        expected = sorted_records(*cifar.load_binary(archive_root, dataset, split))
        for ours, theirs in zip(expected, sorted_records(x, y)):
            np.testing.assert_array_equal(ours, theirs)
