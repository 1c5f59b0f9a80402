"""ImageNet input: TFRecord shards in build_imagenet_data.py's layout, tfds, preprocessing.

The fixture writes tiny shards exactly as that script names and fills them (real JPEGs of
several sizes, `image/class/label` 1-based, plus some of its other features); tfds is
exercised under `tfds.testing.mock_data`, and without archives for the error message.
"""

import os
import re
import socket

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dml_tf.data import imagenet
from dml_tf.errors import UserError

SIZE = 32  # pipeline output side in most tests: a real (down)resize, cheap
# Shard name -> (height, width, 1-based label) of its records, in file order.
SHARDS = {
    "train-00000-of-00002": [(48, 64, 1), (60, 40, 1000), (37, 53, 7), (80, 80, 500)],
    "train-00001-of-00002": [(45, 90, 2), (64, 48, 999), (50, 50, 3), (41, 77, 42)],
    "validation-00000-of-00001": [(48, 64, 11), (72, 40, 12), (40, 40, 13), (33, 59, 14),
                                  (64, 96, 15)],
}


def pattern(height, width, k):
    """A smooth RGB test image (JPEG keeps it close), different for each k."""
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    channels = [(x * 255 // max(width - 1, 1) + 40 * k) % 256,
                (y * 255 // max(height - 1, 1) + 70 * k) % 256,
                ((x + y) * 2 + 25 * k) % 256]
    return np.stack(channels, -1).astype(np.uint8)


def jpeg(image):
    return tf.io.encode_jpeg(image, quality=95).numpy()


def example(image, label, drop=(), encoded=None):
    """A tf.train.Example with build_imagenet_data.py's features (only two are read).

    `drop` leaves features out; `encoded` replaces the JPEG bytes of `image`.
    """
    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    features = {
        "image/height": i(image.shape[0]),
        "image/width": i(image.shape[1]),
        "image/colorspace": b(b"RGB"),
        "image/channels": i(3),
        "image/class/label": i(label),
        "image/class/synset": b(b"n01440764"),
        "image/format": b(b"JPEG"),
        "image/filename": b(b"n01440764_10026.JPEG"),
        "image/encoded": b(jpeg(image) if encoded is None else encoded),
    }
    return tf.train.Example(features=tf.train.Features(feature={
        k: v for k, v in features.items() if k not in drop})).SerializeToString()


def write_shards(folder, shards=SHARDS, label_shift=0):
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for name, records in shards.items():
        with tf.io.TFRecordWriter(str(folder / name)) as writer:
            for height, width, label in records:
                writer.write(example(pattern(height, width, k), label - label_shift))
                k += 1
    return folder


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("imagenet_tfrecords"))


@pytest.fixture
def source(shard_dir):
    return imagenet.Source(data_dir=str(shard_dir))


def take_all(ds):
    images, labels = [], []
    for x, y in ds:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_list_shards(shard_dir):
    train = imagenet.list_shards(shard_dir, "train")
    assert [os.path.basename(p) for p in train] == ["train-00000-of-00002",
                                                     "train-00001-of-00002"]
    assert [os.path.basename(p) for p in imagenet.list_shards(str(shard_dir), "validation")] \
        == ["validation-00000-of-00001"]
    assert imagenet.Source(data_dir=str(shard_dir)).kind == "tfrecord"
    assert imagenet.Source().kind == "tfds"


def test_missing_or_empty_folder_names_flag_and_pattern(tmp_path):
    with pytest.raises(UserError, match=r"--data_dir=.*not a folder.*train-NNNNN-of-MMMMM"):
        imagenet.list_shards(tmp_path / "nope", "train")
    (tmp_path / "train-00000.tfrecord").write_bytes(b"")  # not the layout
    with pytest.raises(UserError, match=r"--data_dir=.*no validation shards.*"
                                        r"validation-NNNNN-of-MMMMM"):
        imagenet.list_shards(tmp_path, "validation")
    with pytest.raises(UserError, match="--data_dir"):
        imagenet.train_dataset(imagenet.Source(data_dir=str(tmp_path)), 2, seed=0)


def test_mixed_shard_totals_are_an_error(tmp_path):
    for name in ("train-00000-of-00002", "train-00000-of-01024"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match="mixes train shards"):
        imagenet.list_shards(tmp_path, "train")


def test_train_batches(source):
    ds = imagenet.train_dataset(source, batch_size=4, seed=3, image_size=SIZE)
    assert ds.element_spec[0].shape.as_list() == [4, SIZE, SIZE, 3]
    images, labels = take_all(ds)
    assert images.shape == (8, SIZE, SIZE, 3) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.std() > 0.1  # real pixels, not a constant
    assert labels.dtype == np.int64
    # Every training record once per epoch, labels 1-based in the file, 0-based out.
    expected = [label - 1 for name, recs in SHARDS.items() if name.startswith("train")
                for _, _, label in recs]
    assert sorted(labels.tolist()) == sorted(expected)


def test_train_default_size_is_224(source):
    images, labels = next(iter(imagenet.train_dataset(source, batch_size=2, seed=0)))
    assert images.shape == (2, 224, 224, 3) and labels.shape == (2,)


def test_same_seed_same_batches_new_epoch_new_batches(source):
    def run(seed):
        return take_all(imagenet.train_dataset(source, batch_size=4, seed=seed,
                                               image_size=SIZE))

    a, b, c = run(5), run(5), run(6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    ds = imagenet.train_dataset(source, batch_size=4, seed=5, image_size=SIZE)
    first, second = take_all(ds), take_all(ds)
    assert not np.array_equal(first[0], second[0])  # each iterator is a new epoch


def bilinear(image, height, width):
    """tf.image.resize(bilinear) in numpy: half-pixel centres, clamped edges, no antialias."""
    def axis(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = axis(image.shape[0], height)
    x0, x1, fx = axis(image.shape[1], width)
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def reference_eval(image, size):
    """Shorter side to round(size / 0.875), then the central size x size crop, [-1, 1]."""
    h, w = image.shape[:2]
    side = round(size / 0.875)
    new_h, new_w = round(h * side / min(h, w)), round(w * side / min(h, w))
    resized = bilinear(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size] / 127.5 - 1.0


@pytest.mark.parametrize("shape,size", [((48, 64), SIZE), ((72, 40), SIZE), ((300, 200), 224)])
def test_eval_center_crop_matches_numpy(shape, size):
    image_bytes = jpeg(pattern(*shape, k=3))
    decoded = tf.io.decode_jpeg(image_bytes, channels=3).numpy()
    got = imagenet.eval_preprocess(tf.constant(image_bytes), size).numpy()
    assert got.shape == (size, size, 3)
    np.testing.assert_allclose(got, reference_eval(decoded, size), atol=1e-4)
    # The serving transform on decoded uint8 batches is the same function.
    batch = imagenet.preprocess_uint8(np.stack([decoded, decoded[:, ::-1]]), size).numpy()
    np.testing.assert_allclose(batch[0], got, atol=1e-6)
    np.testing.assert_allclose(batch[1], reference_eval(decoded[:, ::-1], size), atol=1e-4)


def test_eval_covers_every_record_once_in_order(source):
    ds = imagenet.eval_dataset(source, batch_size=2, image_size=SIZE)
    images, labels = take_all(ds)
    records = SHARDS["validation-00000-of-00001"]
    assert labels.tolist() == [label - 1 for _, _, label in records]
    assert [len(y) for _, y in ds] == [2, 2, 1]  # the last batch keeps the remainder
    # In file order: record k is the k-th image written to the validation shard.
    first = 8  # pattern index of the first validation record (8 training records before)
    for k, (height, width, _) in enumerate(records):
        decoded = tf.io.decode_jpeg(jpeg(pattern(height, width, first + k))).numpy()
        np.testing.assert_allclose(images[k], reference_eval(decoded, SIZE), atol=1e-4)


@pytest.mark.parametrize("shape", [(300, 200, 3), (64, 480, 3), (100, 100, 3)])
def test_crop_window_respects_area_and_aspect_bounds(shape):
    seeds = tf.data.Dataset.random(seed=11).batch(2).take(300)
    windows = np.stack([imagenet.sample_crop_window(tf.constant(shape), s).numpy()
                        for s in seeds])
    top, left, height, width = windows.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= shape[0]).all() and (left + width <= shape[1]).all()
    whole = (height == shape[0]) & (width == shape[1])
    area = height * width / (shape[0] * shape[1])
    aspect = width / height
    crops = ~whole  # the whole image is the fallback when 100 attempts fail
    # Integer rounding of the window moves the bounds by up to about a pixel per side.
    slack_area = (height + width + 1) / (shape[0] * shape[1])
    assert (area[crops] >= imagenet.MIN_OBJECT_COVERED - slack_area[crops]).all()
    assert (area[crops] >= imagenet.AREA_RANGE[0] - slack_area[crops]).all()
    assert (aspect[crops] >= 0.75 * (1 - 1.5 / height[crops]) - 1.0 / height[crops]).all()
    assert (aspect[crops] <= 4 / 3 * (1 + 1.5 / width[crops]) + 1.0 / height[crops]).all()
    # Random, not constant: many distinct windows spanning a wide range of areas.
    assert crops.mean() > 0.5
    assert len({tuple(w) for w in windows}) > 100
    # A 3/4..4/3 window of a long, thin image covers at most 4/3 short / long of it.
    largest = min(1.0, 4 / 3 * min(shape[:2]) / max(shape[:2]))
    assert area[crops].min() < 0.3 and area[crops].max() > 0.7 * largest
    # Same seed, same window.
    s = tf.constant([1, 2], tf.int64)
    np.testing.assert_array_equal(imagenet.sample_crop_window(tf.constant(shape), s),
                                  imagenet.sample_crop_window(tf.constant(shape), s))


def test_train_preprocess_is_the_crop_then_resize_then_flip():
    image_bytes = jpeg(pattern(60, 90, 5))
    seed = tf.constant([4, 9], tf.int64)
    got = imagenet.train_preprocess(tf.constant(image_bytes), seed, SIZE).numpy()
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    oy, ox, h, w = imagenet.sample_crop_window(tf.constant([60, 90, 3]), crop_seed).numpy()
    crop = tf.io.decode_and_crop_jpeg(image_bytes, [oy, ox, h, w], channels=3).numpy()
    expected = bilinear(crop, SIZE, SIZE) / 127.5 - 1.0
    flipped = tf.image.stateless_random_flip_left_right(np.zeros((1, 2, 1)) + [[[0], [1]]],
                                                        flip_seed).numpy()[0, 0, 0] == 1
    if flipped:
        expected = expected[:, ::-1]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_label_offset(tmp_path):
    folder = write_shards(tmp_path, {"validation-00000-of-00001": [(40, 40, 1), (40, 40, 1000)]},
                          label_shift=1)  # stored 0 and 999
    _, labels = take_all(imagenet.eval_dataset(imagenet.Source(data_dir=str(folder),
                                                               label_offset=0), 4, SIZE))
    assert labels.tolist() == [0, 999]
    one_based = imagenet.Source(data_dir=str(folder))
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        take_all(imagenet.eval_dataset(one_based, 4, SIZE))
    assert str(imagenet.record_error(err.value, one_based)) == (
        f"{folder / 'validation-00000-of-00001'}, record 0 (from 0): its label -1 "
        f"(image/class/label 0 minus label_offset=1) is outside ImageNet's class indices 0..999; "
        f"build_imagenet_data.py labels are 1..1000 (label_offset=1), shards with 0-based labels "
        f"need label_offset=0.")


def test_num_examples(source, tmp_path):
    assert imagenet.num_examples(source, "train") == 8
    assert imagenet.num_examples(source, "validation") == 5
    # The complete standard set of shards: ImageNet's sizes without reading a record.
    for i in range(1024):
        (tmp_path / f"train-{i:05d}-of-01024").write_bytes(b"")
    full = imagenet.Source(data_dir=str(tmp_path))
    assert imagenet.num_examples(full, "train") == 1_281_167


def test_input_context_splits_the_shards(source):
    labels = []
    for i in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i)
        labels.append(take_all(imagenet.train_dataset(source, 2, seed=0, image_size=8,
                                                      input_context=context))[1])
    assert not set(labels[0]) & set(labels[1])
    assert len(labels[0]) + len(labels[1]) == 8
    # Validation has one shard for two pipelines: the records are split instead.
    parts = [take_all(imagenet.eval_dataset(
        source, 2, 8, input_context=tf.distribute.InputContext(2, i, 1)))[1] for i in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == [10, 11, 12, 13, 14]


@pytest.fixture
def no_network(monkeypatch):
    """Fails the test on any outgoing connection."""
    def connect(self, address, *args):
        raise AssertionError(f"network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)


def test_tfds_under_mock_data(tmp_path, no_network):
    source = imagenet.Source(tfds_data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=6):
        train = imagenet.train_dataset(source, batch_size=3, seed=0, image_size=SIZE)
        images, labels = take_all(train)
        assert images.shape == (6, SIZE, SIZE, 3) and images.dtype == np.float32
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < 1000
        eval_images, eval_labels = take_all(imagenet.eval_dataset(source, 4, SIZE))
        assert eval_images.shape == (6, SIZE, SIZE, 3)
        assert eval_labels.min() >= 0 and eval_labels.max() < 1000
        assert imagenet.num_examples(source, "train") == 6


class Prepared(Exception):
    """Raised by the stand-in for download_and_prepare."""


def test_tfds_missing_manual_archives(tmp_path, monkeypatch, no_network):
    def prepare(self, *args, **kwargs):
        raise Prepared(kwargs)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
    source = imagenet.Source(tfds_data_dir=str(tmp_path))
    manual = os.path.join(str(tmp_path), "downloads", "manual")
    with pytest.raises(UserError) as err:
        imagenet.train_dataset(source, 2, seed=0)
    message = str(err.value)
    assert manual in message and "--data_dir" in message and "--tfds_data_dir" in message
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert message.count(". ") == 0  # one sentence
    # With one archive in place the message names only the other one as missing.
    os.makedirs(manual)
    open(os.path.join(manual, "ILSVRC2012_img_train.tar"), "wb").close()
    with pytest.raises(UserError, match=r"ILSVRC2012_img_val.tar is not in"):
        imagenet.eval_dataset(source, 2)
    # With both, tfds prepares the dataset from them (stood in for here).
    open(os.path.join(manual, "ILSVRC2012_img_val.tar"), "wb").close()
    with pytest.raises(Prepared):
        imagenet.num_examples(source, "validation")


def test_image_size_pair(source):
    images, _ = next(iter(imagenet.eval_dataset(source, 2, image_size=(SIZE, SIZE))))
    assert images.shape == (2, SIZE, SIZE, 3)
    with pytest.raises(UserError, match="--image_size=32,48 must be square"):
        imagenet.train_dataset(source, 2, seed=0, image_size=(32, 48))


def test_bad_batch_size(source):
    with pytest.raises(UserError, match="--batch_size=0"):
        imagenet.train_dataset(source, 0, seed=0)
    with pytest.raises(UserError, match="--eval_batch_size=0"):
        imagenet.eval_dataset(source, 0)


# --- damaged shards and records -----------------------------------------------------------

def png(image):
    return tf.io.encode_png(image).numpy()


RECORD_FAULTS = {  # fault -> (the record, the words of the message)
    "truncated jpeg": (
        lambda image: example(image, 5, encoded=jpeg(image)[:len(jpeg(image)) // 2]),
        r"its image/encoded is a truncated JPEG \(it stops before its end-of-image marker\); "
        r"rebuild that shard with build_imagenet_data.py or remove it from "),
    "png record": (lambda image: example(image, 5, encoded=png(image)),
                   r"its image/encoded is a PNG image, not a JPEG; rebuild that shard"),
    "no image/encoded": (lambda image: example(image, 5, drop=("image/encoded",)),
                         r"it has no image/encoded \(or an empty one\); rebuild that shard"),
    "no label": (lambda image: example(image, 5, drop=("image/class/label",)),
                 r"it has no image/class/label; rebuild that shard"),
    "not a jpeg": (lambda image: example(image, 5, encoded=b"GIF89a..."),
                   r"its image/encoded is not a JPEG image; rebuild that shard"),
}


def write_records(path, records):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def faulty_shards(folder, record, split="train", position=2):
    """Valid shards (real JPEGs), with `record` at `position` of the split's first shard."""
    write_shards(folder)
    images = [pattern(40 + k, 48, k) for k in range(4)]
    records = [example(image, 3) for image in images]
    records[position] = record(images[position])
    shard = folder / f"{split}-00000-of-{'00002' if split == 'train' else '00001'}"
    return write_records(shard, records)


def expected_message(shard, index, words):
    return rf"^{re.escape(shard)}, record {index} \(from 0\): {words}"


# Every fault in the evaluation pipeline; two in the training one, which reads records
# through the same checks (and costs more to run).
@pytest.mark.parametrize("fault, split", [(fault, "validation") for fault in sorted(RECORD_FAULTS)]
                         + [("png record", "train"), ("truncated jpeg", "train")])
def test_a_bad_record_is_named_by_the_pipelines_and_check_shards(tmp_path, fault, split):
    record, words = RECORD_FAULTS[fault]
    source = imagenet.Source(data_dir=str(tmp_path))
    shard = faulty_shards(tmp_path, record, split)
    imagenet.check_shards(source)  # the first records are sound
    with pytest.raises(UserError, match=expected_message(shard, 2, words)):
        imagenet.check_shards(source, every_record=True)
    # The pipelines stop at the record with TensorFlow's error, which record_error (the task's
    # diagnosis) turns into the same sentence.
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        if split == "train":
            take_all(imagenet.train_dataset(source, 2, seed=0, image_size=8))
        else:
            take_all(imagenet.eval_dataset(source, 2, image_size=8))
    message = str(imagenet.record_error(err.value, source))
    assert re.match(expected_message(shard, 2, words), message), message
    assert message.endswith(".") and ". " not in message


@pytest.mark.parametrize("fault", sorted(RECORD_FAULTS))
def test_a_bad_first_record_is_named_before_reading_the_data(tmp_path, fault):
    record, words = RECORD_FAULTS[fault]
    shard = faulty_shards(tmp_path, record, "validation", position=0)
    with pytest.raises(UserError, match=expected_message(shard, 0, words)):
        imagenet.check_shards(imagenet.Source(data_dir=str(tmp_path)))


SHARD_FAULTS = {  # fault -> (the shard's bytes from valid ones, the words of the message)
    "garbage": (lambda data: b"<html>404 Not Found</html>" * 40,
                r" is not a complete TFRecord file \(TensorFlow: corrupted record at 0"),
    "empty": (lambda data: b"", r" holds no records"),
    "cut short": (lambda data: data[:len(data) - 100],
                  r" is not a complete TFRecord file \(TensorFlow: truncated record at "),
}


@pytest.mark.parametrize("fault", sorted(SHARD_FAULTS))
def test_a_damaged_shard_is_named(tmp_path, fault):
    rewrite, words = SHARD_FAULTS[fault]
    write_shards(tmp_path)
    shard = tmp_path / "train-00001-of-00002"
    shard.write_bytes(rewrite(shard.read_bytes()))
    source = imagenet.Source(data_dir=str(tmp_path))
    expected = rf"^{re.escape(str(shard))}{words}.*; rebuild it with build_imagenet_data.py or " \
               rf"remove it from {re.escape(str(tmp_path))}\.$"
    if fault != "cut short":  # its first record is whole: only a full read finds the cut
        with pytest.raises(UserError, match=expected):
            imagenet.check_shards(source)
    with pytest.raises(UserError, match=expected):
        imagenet.check_shards(source, every_record=True)
    if fault != "empty":  # a count of 0 is no error; the checks above refuse it
        with pytest.raises(UserError, match=expected):
            imagenet.num_examples(source, "train")  # counts a smoke-test subset's records


def test_a_record_that_is_not_an_example_is_named(tmp_path):
    write_shards(tmp_path)
    shard = write_records(tmp_path / "validation-00000-of-00001",
                          [b"\x00\x01 not a protocol buffer \xff" * 3])
    with pytest.raises(UserError, match=rf"^{re.escape(shard)}, record 0 \(from 0\): it is not "
                                        rf"a tf.train.Example with ImageNet's features"):
        imagenet.check_shards(imagenet.Source(data_dir=str(tmp_path)))


def test_check_shards_passes_sound_shards_and_counts_nothing_twice(shard_dir):
    source = imagenet.Source(data_dir=str(shard_dir))
    imagenet.check_shards(source)
    imagenet.check_shards(source, every_record=True)
    assert imagenet.num_examples(source, "train") == 8


def test_a_shard_cut_short_during_a_run_names_the_folder(tmp_path):
    write_shards(tmp_path)
    shard = tmp_path / "validation-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:-100])  # its last record cut short
    source = imagenet.Source(data_dir=str(tmp_path))
    with pytest.raises(tf.errors.DataLossError) as err:
        take_all(imagenet.eval_dataset(source, 2, image_size=8))
    message = str(imagenet.record_error(err.value, source))
    assert message.startswith(f"A TFRecord shard in {tmp_path} is damaged (TensorFlow: truncated "
                              f"record at ")
    assert "check_shards(" in message and message.endswith(".") and ". " not in message
    # The check it points to names the shard.
    with pytest.raises(UserError, match=f"^{re.escape(str(shard))} is not a complete TFRecord"):
        imagenet.check_shards(source, every_record=True)
