"""Labels and shapes are checked where data enter: every loader and the ImageData type.

Each case builds a file in the loader's exact on-disk format (or arrays in Python) with one
fault, and expects one sentence naming the file (or the argument), the offending index and
value. Valid data still load, with labels cast to int64 [N].
"""

import os
import re
import shutil
import types

import numpy as np
import pytest
import tensorflow as tf

import dml_tf.data
from data_cifar_test import PLANE, record_bytes, write  # the CIFAR binary writer
from data_imagenet_test import write_shards  # build_imagenet_data.py-style shards
from data_market1501_test import write_market  # the tiny Market-1501 layout
from dml_tf import tasks
from dml_tf.data import ImageData, cifar, imagenet, market1501
from dml_tf.errors import UserError

SIDE = 8


def images(n, seed=0, side=SIDE):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def one_sentence(error):
    """The message of a UserError, checked to be one sentence."""
    message = str(error.value)
    assert message.endswith(".") and ". " not in message, message
    return message


def arrays(**changes):
    """A valid dataset (3 classes, 6 training and 3 test images) with `changes` applied."""
    values = dict(x_train=images(6), y_train=np.array([0, 1, 2, 0, 1, 2]), x_test=images(3, 1),
                  y_test=np.array([2, 0, 1]))
    values.update(changes)
    return values


def save_npz(path, **changes):
    np.savez(path, **arrays(**changes))
    return str(path)


# --- npz -------------------------------------------------------------------------------

def test_valid_npz_loads_with_labels_cast(tmp_path):
    path = save_npz(tmp_path / "d.npz", y_train=np.array([[0], [1], [2], [0], [1], [2]], np.uint8),
                    y_test=np.array([2.0, 0.0, 1.0]))
    data = dml_tf.data.load_npz(path)
    assert data.num_classes == 3
    assert data.y_train.dtype == np.int64 and data.y_train.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.y_test.dtype == np.int64 and data.y_test.tolist() == [2, 0, 1]
    pixels = data.x_train.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(data.std, pixels.std(axis=0), rtol=1e-12)


NPZ_FAULTS = {
    # A stray label 12 among 0..9 would have made a 13-class model with 2 empty classes.
    "skipped class indices": (
        dict(x_train=images(14), y_train=np.array(list(range(10)) + [12, 0, 1, 2]),
             y_test=np.array([0, 1, 2])),
        r"y_train has no example of class indices 10, 11 \(its labels run 0\.\.12\)"),
    # max + 1 classes would need an example each: more than there are images. Refused before
    # numpy counts the examples of 2^40 classes (an 8 TiB array: MemoryError).
    "label 2^40": (dict(y_train=np.array([0, 1, 2, 0, 2 ** 40, 2])),
                   r"y_train\[4\] is 1099511627776, more classes than its 6 examples can have; "
                   r"labels must be class indices 0\.\.M-1 with M <= 6"),
    "label 2^63 as uint64": (dict(y_train=np.array([0, 1, 2, 2 ** 63, 1, 2], np.uint64)),
                             r"y_train\[3\] is 9223372036854775808, more classes than"),
    "whole float label 1e300": (dict(y_train=np.array([0, 1, 2, 0, 1, 1e300])),
                                r"y_train\[5\] is 1e\+300, more classes than"),
    "test class never trained": (
        dict(y_test=np.array([0, 3, 1])), r"y_test\[1\] is 3, a class with no example in y_train"),
    "negative label": (dict(y_train=np.array([0, 1, 2, -4, 1, 2])), r"y_train\[3\] is -4"),
    "fractional label": (dict(y_train=np.array([0, 1, 2.5, 0, 1, 2])),
                         r"y_train\[2\] is 2\.5, not a whole number"),
    "NaN label": (dict(y_test=np.array([2, np.nan, 1])), r"y_test\[1\] is nan, not a whole"),
    "string labels": (dict(y_train=np.array(list("abcabc"))), r"y_train must hold integer"),
    "length mismatch": (dict(y_train=np.array([0, 1, 2, 0, 1])),
                        r"y_train has 5 labels for 6 images in x_train"),
    "2-D labels": (dict(y_train=np.zeros((6, 3), np.int64)),
                   r"y_train must be labels of shape \[N\] or \[N, 1\], got shape \(6, 3\)"),
    "image sizes differ": (dict(x_test=images(3, side=SIDE + 2)),
                           r"x_test\[0\] is 10x10x3 \(H x W x C\) but x_train images are 8x8x3"),
    "grey images": (dict(x_test=images(3)[..., :1]), r"x_test must be uint8 images"),
    "float images": (dict(x_train=images(6).astype(np.float32)),
                     r"x_train must be uint8 images \[N, H, W, 3\], got float32"),
    "empty test split": (dict(x_test=images(0), y_test=np.zeros(0, np.int64)),
                         r"x_test holds no images"),
}


@pytest.mark.parametrize("fault", NPZ_FAULTS)
def test_npz_faults_name_the_file_and_index(tmp_path, fault):
    changes, expected = NPZ_FAULTS[fault]
    path = save_npz(tmp_path / "d.npz", **changes)
    with pytest.raises(UserError) as err:
        dml_tf.data.load_npz(path)
    message = one_sentence(err)
    assert message.startswith(f"{path}: ")
    assert re.search(expected, message), message


def test_npz_constant_channel(tmp_path):
    x = images(6)
    x[..., 1] = 77  # a green plane that never varies: its std is 0
    path = save_npz(tmp_path / "d.npz", x_train=x)
    with pytest.raises(UserError) as err:
        dml_tf.data.load_npz(path)
    assert one_sentence(err).startswith(f"{path}: x_train channel 1 is constant (std[1] = 0.0)")


@pytest.mark.parametrize("content", ["no arrays", "no bytes"])
def test_empty_npz_names_the_file(tmp_path, content):
    path = tmp_path / "empty.npz"
    if content == "no arrays":
        np.savez(path)
    else:
        path.write_bytes(b"")
    with pytest.raises(UserError) as err:
        dml_tf.data.load_npz(str(path))
    assert str(path) in one_sentence(err) and "x_train" in str(err.value)


def test_npz_fault_stops_the_task_before_training(tmp_path):
    from dml_tf import config as config_lib
    path = save_npz(tmp_path / "d.npz", y_test=np.array([0, 7, 1]))
    config = config_lib.Config(dataset="npz", data_dir=path, model_dir=str(tmp_path / "run"))
    with pytest.raises(UserError, match=r"y_test\[1\] is 7"):
        tasks.make(config)
    assert not os.path.exists(tmp_path / "run")


# --- ImageData built in Python ----------------------------------------------------------

def image_data(**changes):
    return ImageData(**arrays(**changes), num_classes=3, mean=(127.0,) * 3, std=(70.0,) * 3,
                     name="mine")


def test_image_data_casts_integer_valued_labels():
    data = image_data(y_train=np.array([0.0, 1.0, 2.0, 0.0, 1.0, 2.0], np.float32),
                      y_test=np.array([[2], [0], [1]], np.int32))
    assert data.y_train.dtype == np.int64 and data.y_train.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.y_test.dtype == np.int64 and data.y_test.tolist() == [2, 0, 1]


IMAGE_DATA_FAULTS = {
    "label = num_classes": (dict(y_train=np.array([0, 1, 2, 0, 3, 2])),
                            r"^y_train\[4\] is 3, outside the class indices 0\.\.2"),
    "negative test label": (dict(y_test=np.array([2, 0, -1])),
                            r"^y_test\[2\] is -1, outside the class indices 0\.\.2"),
    "class without training example": (dict(y_train=np.array([0, 1, 1, 0, 1, 0])),
                                       r"^y_test\[0\] is 2, a class with no example in y_train"),
    "fractional float": (dict(y_test=np.array([2.0, 0.5, 1.0])),
                         r"^y_test\[1\] is 0\.5, not a whole number"),
    "boolean labels": (dict(y_train=np.ones(6, bool)), r"^y_train must hold integer class"),
    "labels [N, 2]": (dict(y_test=np.zeros((3, 2), np.int64)), r"^y_test must be labels of shape"),
    "more labels than images": (dict(y_test=np.array([2, 0, 1, 1])),
                                r"^y_test has 4 labels for 3 images in x_test"),
    "test images of another size": (dict(x_test=images(3, side=SIDE * 2)),
                                    r"^x_test\[0\] is 16x16x3 \(H x W x C\)"),
    "test images of 4 channels": (dict(x_test=np.zeros((3, SIDE, SIDE, 4), np.uint8)),
                                  r"^x_test must be uint8 images"),
    "empty training split": (dict(x_train=images(0), y_train=np.zeros(0, np.int64)),
                             r"^x_train holds no images"),
}


@pytest.mark.parametrize("fault", IMAGE_DATA_FAULTS)
def test_image_data_faults_name_the_argument(fault):
    changes, expected = IMAGE_DATA_FAULTS[fault]
    with pytest.raises(UserError) as err:
        image_data(**changes)
    assert re.search(expected, one_sentence(err)), str(err.value)


def test_image_data_refuses_a_zero_std():
    with pytest.raises(UserError) as err:
        ImageData(**arrays(), num_classes=3, mean=(1.0, 2.0, 3.0), std=(5.0, 6.0, 0.0), name="m")
    assert one_sentence(err).startswith("x_train channel 2 is constant (std[2] = 0.0)")
    with pytest.raises(UserError, match=r"^std must be 3 finite"):
        ImageData(**arrays(), num_classes=3, mean=(1.0,) * 3, std=(5.0, np.nan, 1.0), name="m")


@pytest.mark.parametrize("num_classes", [0, 2.0, True])
def test_image_data_refuses_a_bad_class_count(num_classes):
    with pytest.raises(UserError, match=rf"^num_classes must be a positive int, got {num_classes}"):
        ImageData(**arrays(), num_classes=num_classes, mean=(1.0,) * 3, std=(1.0,) * 3, name="m")


def test_from_arrays_allowances():
    # Semi-supervised training sets mark unlabelled examples -1; nothing else negative.
    data = ImageData.from_arrays(**arrays(y_train=np.array([0, -1, 2, 0, 1, 2])), name="m",
                                 source=None, num_classes=3, allow_unlabelled=True)
    assert data.y_train.tolist() == [0, -1, 2, 0, 1, 2]
    with pytest.raises(UserError, match=r"^y_train\[1\] is -2"):
        ImageData.from_arrays(**arrays(y_train=np.array([0, -2, 2, 0, 1, 2])), name="m",
                              source=None, num_classes=3, allow_unlabelled=True)
    # A ClassificationTask other than dml_all's refuses the unlabelled examples.
    with pytest.raises(UserError) as err:
        tasks.ClassificationTask(data)
    assert one_sentence(err).startswith("y_train[1] is -1 (unlabelled)")
    # Re-identification queries are labelled by identity, not by a trained class.
    identities = ImageData.from_arrays(**arrays(y_test=np.array([3, 1501, 7])), name="m",
                                       source=None, num_classes=3, test_labels_are_classes=False)
    assert identities.y_test.tolist() == [3, 1501, 7]


# --- ClassificationTask -------------------------------------------------------------------

def test_task_refuses_images_too_small_for_the_augmentation():
    data = ImageData(**arrays(x_train=images(6, side=4), x_test=images(3, side=4)), num_classes=3,
                     mean=(1.0,) * 3, std=(1.0,) * 3, name="m")
    with pytest.raises(UserError) as err:
        tasks.ClassificationTask(data)
    assert one_sentence(err).startswith("x_train images are 4x4")


def test_task_refuses_a_held_out_split_that_empties_a_class():
    # Class 2 has one example: a per-class hold-out takes at least one of every class.
    data = image_data(y_train=np.array([0, 1, 2, 0, 1, 0]), y_test=np.array([2, 0, 1]))
    with pytest.raises(UserError) as err:
        tasks.ClassificationTask(data).split_validation(0.1, seed=0)
    assert one_sentence(err).startswith("fraction=0.1 holds out every training example of class 2")


def test_task_semi_supervised_keeps_unlabelled_examples():
    task = tasks.ClassificationTask(image_data(x_train=images(12), y_train=np.arange(12) % 3))
    config = types.SimpleNamespace(labelled_fraction=0.25, seed=0)
    everything = task.semi_supervised("dml_all", config)
    labelled = everything.data.y_train >= 0
    assert (everything.data.y_train[~labelled] == -1).all()
    assert [int(labelled[task.data.y_train == c].sum()) for c in range(3)] == [1, 1, 1]


# --- CIFAR binary files and tensorflow-datasets -------------------------------------------

def write_cifar10(folder, train_labels, test_labels, constant_green=False):
    """data_batch_1 holds every training record (the others one each), test_batch the rest."""
    def record(k, label):
        data = bytearray(record_bytes(k, [label]))
        if constant_green:
            data[1 + PLANE:1 + 2 * PLANE] = bytes([9]) * PLANE
        return bytes(data)

    train = [record(k, label) for k, label in enumerate(train_labels)]
    write(folder / "data_batch_1.bin", train[:-4])
    for i, data in enumerate(train[-4:], start=2):
        write(folder / f"data_batch_{i}.bin", [data])
    write(folder / "test_batch.bin", [record(50 + k, y) for k, y in enumerate(test_labels)])
    return folder


def test_cifar_test_class_without_training_images(tmp_path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-bin", [0, 1, 2, 3, 4, 5], [1, 7, 0])
    with pytest.raises(UserError) as err:
        dml_tf.data.load("cifar10", data_dir=str(folder))
    message = one_sentence(err)
    assert message.startswith(f"{folder}: y_test[1] is 7, a class with no example in y_train")


def test_cifar_constant_channel(tmp_path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-bin", [0, 1, 2, 3, 4, 5], [1, 0],
                           constant_green=True)
    with pytest.raises(UserError) as err:
        dml_tf.data.load("cifar10", data_dir=str(folder))
    assert one_sentence(err).startswith(f"{folder}: x_train channel 1 is constant")


def test_cifar_valid_binary_still_loads(tmp_path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-bin", [0, 1, 2, 3, 4, 5, 1], [5, 0])
    data = dml_tf.data.load("cifar10", data_dir=str(folder.parent))
    assert data.num_classes == 10 and data.y_test.tolist() == [5, 0]


def test_tfds_test_class_without_training_images(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def as_dataset(self, split, *args, **kwargs):
        labels = [4, 9] if "test" in str(split) else [0, 4, 4]
        return tf.data.Dataset.from_tensor_slices({
            "image": images(len(labels), side=32), "label": np.array(labels, np.int64),
            "id": np.array([f"x{k}" for k in range(len(labels))])})

    monkeypatch.setattr(cifar, "_reachable", lambda *args, **kwargs: [False, False])
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        with pytest.raises(UserError) as err:
            dml_tf.data.load("cifar10", tfds_data_dir=str(tmp_path))
    message = one_sentence(err)
    assert message.startswith(f"tensorflow-datasets cifar10 in {tmp_path}: y_test[1] is 9")


# --- digits -----------------------------------------------------------------------------

def test_digits_label_out_of_range_names_the_source(monkeypatch):
    import sklearn.datasets

    def load_digits():
        target = np.arange(110) % 11  # a class index 10 among the ten digits
        rng = np.random.default_rng(0)
        return types.SimpleNamespace(images=rng.integers(0, 17, (110, 8, 8)).astype(float),
                                     target=target)

    monkeypatch.setattr(sklearn.datasets, "load_digits", load_digits)
    with pytest.raises(UserError) as err:
        dml_tf.data.load("digits")
    assert re.match(r"scikit-learn's digits: y_(train|test)\[\d+\] is 10, outside the class "
                    r"indices 0\.\.9", one_sentence(err))


# --- Market-1501 ----------------------------------------------------------------------------

@pytest.fixture
def market(tmp_path):
    root = tmp_path / market1501.DATASET_FOLDER
    write_market(str(root))
    return root


@pytest.mark.parametrize("folder, original, renamed, words", [
    ("bounding_box_test", "0005_c3s1_000040_02.jpg", "0005_c7s1_000040_02.jpg", "names camera c7"),
    ("query", "0005_c2s1_000020_00.jpg", "0000_c2s1_000020_00.jpg",
     "is a junk (-1) or distractor (0000) image"),
])
def test_market_camera_outside_c1_c6_or_a_distractor_query_is_named(market, folder, original,
                                                                   renamed, words):
    bad = market / folder / renamed
    shutil.move(market / folder / original, bad)
    with pytest.raises(UserError) as err:
        market1501.scan(str(market))
    assert one_sentence(err).startswith(f"{bad} {words}")


def test_market_queries_the_protocol_cannot_score(market):
    # Query 0005 loses its only gallery image: the protocol skips it, the other still counts.
    os.remove(market / "bounding_box_test" / "0005_c3s1_000040_02.jpg")
    splits = market1501.scan(str(market))
    assert splits["query"].pids.tolist() == [3, 5]
    # Query 0003 (camera 1) keeps only its camera-1 gallery image, which the protocol ignores.
    os.remove(market / "bounding_box_test" / "0003_c4s1_000030_01.jpg")
    with pytest.raises(UserError) as err:
        market1501.scan(str(market))
    message = one_sentence(err)
    assert message.startswith(f"No image of {market / 'query'} (the first, "
                              f"0003_c1s1_000010_00.jpg, is identity 3)")
    assert "mAP would be undefined" in message


# --- ImageNet TFRecords -------------------------------------------------------------------

def test_imagenet_label_out_of_range_is_one_sentence(tmp_path):
    # 0-based labels read with build_imagenet_data.py's label_offset=1: label 0 becomes -1.
    folder = write_shards(tmp_path / "shards",
                          {"train-00000-of-00001": [(40, 40, 3), (40, 40, 0)],
                           "validation-00000-of-00001": [(40, 40, 11), (40, 40, 1001)]})
    from dml_tf import imagenet_task
    task = imagenet_task.ImagenetTask(imagenet.Source(data_dir=str(folder)), image_size=16)
    with pytest.raises(UserError) as err:
        for _ in tasks.diagnosed(task, task.train_dataset(batch_size=1, seed=0)):
            pass
    message = one_sentence(err)
    assert message.startswith(f"{folder / 'train-00000-of-00001'}, record 1 (from 0): its label "
                              f"-1 (image/class/label 0 minus label_offset=1) is outside "
                              f"ImageNet's class indices 0..999")
    assert "label_offset=0" in message
    # Evaluation reads the validation shards the same way: 1001 - 1 = 1000 is out of range.
    uniform = types.SimpleNamespace(predict=lambda x: [tf.fill([tf.shape(x)[0], 1000], 1e-3)])
    with pytest.raises(UserError, match=rf"^{re.escape(str(folder))}/validation-00000-of-00001, "
                                        rf"record 1 \(from 0\): its label 1000 "):
        task.evaluate(uniform, batch_size=1)


def test_imagenet_shards_are_checked_before_training(tmp_path):
    # A first record out of range, a garbage shard: the task is refused as it is made.
    folder = write_shards(tmp_path / "shards", {"train-00000-of-00001": [(40, 40, 3)],
                                                "validation-00000-of-00001": [(40, 40, 1001)]})
    from dml_tf import imagenet_task
    source = imagenet.Source(data_dir=str(folder))
    with pytest.raises(UserError) as err:
        imagenet_task.ImagenetTask(source, image_size=16)
    assert one_sentence(err).startswith(f"{folder / 'validation-00000-of-00001'}, record 0 "
                                        f"(from 0): its label 1000 ")
    (folder / "validation-00000-of-00001").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(UserError) as err:
        imagenet_task.ImagenetTask(source, image_size=16)
    assert one_sentence(err).startswith(f"{folder / 'validation-00000-of-00001'} is not a "
                                        f"complete TFRecord file (TensorFlow: corrupted record")


def test_a_truncated_npz_is_named(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.arange(4),
             x_test=np.zeros((2, 8, 8, 3), np.uint8), y_test=np.arange(2))
    path.write_bytes(path.read_bytes()[:200])  # as a copy cut short leaves it
    with pytest.raises(UserError, match=f"{path} is not an .npz"):
        dml_tf.data.load_npz(str(path))
