"""ImageNet (ILSVRC 2012): TFRecord shards or tensorflow-datasets, Inception-style pipelines.

Two sources, described by a `Source`:

* A folder of TFRecord shards as written by the TensorFlow models/inception script
  `build_imagenet_data.py`: `train-00000-of-01024` ... `train-01023-of-01024` and
  `validation-00000-of-00128` ... `validation-00127-of-00128`. Each record is a
  `tf.train.Example` with `image/encoded` (RGB JPEG bytes; the script re-encodes the few
  PNG and CMYK files) and `image/class/label` (int64). That script numbers the classes
  1..1000 and keeps 0 for a "background" class, so the label read here is
  `image/class/label - label_offset` with `label_offset=1`, giving 0..999; shards that
  already hold 0-based labels take `label_offset=0`. The other features the script writes
  (size, synset, text, bounding boxes) are not read.
* tensorflow-datasets `imagenet2012` (labels already 0..999). tfds cannot download
  ImageNet: the user downloads ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from
  https://image-net.org and puts them in `<tfds data dir>/downloads/manual/`; the first
  use then prepares the dataset (hours, and about as much disk again as the archives).

Pipelines (paper Sec. 4.4 trains MobileNet and InceptionV1 with Inception preprocessing):

* train: a random crop window drawn by `tf.image.stateless_sample_distorted_bounding_box`
  over the whole image (area 8%..100%, aspect ratio 3/4..4/3, covering at least 10% of the
  image; the whole image when 100 attempts fail), decoded with
  `tf.io.decode_and_crop_jpeg` so only the window is decoded, resized (bilinear) to
  image_size x image_size, flipped left-right with probability 1/2;
* eval: the shorter side resized (bilinear, aspect kept) to image_size / 0.875 (256 for
  224), then the central image_size x image_size crop;
* both: pixels scaled from [0, 255] to [-1, 1], what Keras' MobileNet and Inception
  networks expect. `preprocess_uint8` is the eval transform alone, for serving signatures.

Every record is checked as it is read, before decoding (`_checked_record`): an image that is
missing, empty, a PNG, not a JPEG or a truncated JPEG (`dml_tf.data.jpeg`), and a label that
is missing or outside 0..999, stop the pipeline with an error that `record_error` turns into
one sentence naming the shard and the record. `check_shards` runs the same checks on the
first record of every shard (or every record), and names a file that is not a TFRecord file
or holds no record; the ImageNet task runs it before training.

Randomness is seeded and stateless, as in `dml_tf.data.pipeline`: the shard order, the
shuffle buffer and `tf.data.Dataset.random` (one crop-and-flip seed per example) all start
from `seed`, and every interleave and map keeps its order, so the same seed gives the same
batches; each new iterator (epoch) draws a new sequence.
"""

import dataclasses
import os
import re
from typing import Optional

import numpy as np
import tensorflow as tf

from dml_tf.data import jpeg
from dml_tf.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE
NUM_CLASSES = 1000
IMAGE_SIZE = 224
SPLITS = ("train", "validation")
# ILSVRC 2012 sizes, and the shard counts build_imagenet_data.py writes by default.
NUM_EXAMPLES = {"train": 1_281_167, "validation": 50_000}
STANDARD_SHARDS = {"train": 1024, "validation": 128}
TFDS_NAME = "imagenet2012"
MANUAL_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

# Inception preprocessing (Szegedy et al. 2015; TF-slim inception_preprocessing.py).
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
MIN_OBJECT_COVERED = 0.1
MAX_ATTEMPTS = 100
CROP_FRACTION = 0.875  # eval: 224 / 256

# Shards read at once in training; more only adds open files and read buffers.
CYCLE_LENGTH = 16
# Serialized records (about 110 KB each at ImageNet's sizes): about 1.1 GB of memory.
SHUFFLE_BUFFER = 10_000
_READ_BUFFER_BYTES = 8 << 20

# Defaults instead of parse errors, so that a record missing a feature is named (see
# `_checked_record`): an empty image, and a label no shard holds.
_NO_LABEL = -(2 ** 63)
_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64, default_value=_NO_LABEL),
}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where ImageNet is read from.

    With `data_dir` the TFRecord shards in that folder are read; otherwise
    tensorflow-datasets' `imagenet2012` in `tfds_data_dir`.

    Attributes:
        data_dir: the folder of `train-*-of-*` / `validation-*-of-*` TFRecord shards, or None.
        tfds_data_dir: tensorflow-datasets data dir (None: its default,
            ~/tensorflow_datasets); only read when `data_dir` is None.
        label_offset: subtracted from `image/class/label` of the TFRecords: 1 for
            build_imagenet_data.py's 1..1000 (0 is its unused background class), 0 for shards
            with 0-based labels. tfds labels are 0-based and never shifted.
    """

    data_dir: Optional[str] = None
    tfds_data_dir: Optional[str] = None
    label_offset: int = 1

    @property
    def kind(self):
        """"tfrecord" or "tfds"."""
        return "tfrecord" if self.data_dir else "tfds"


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


def _shard_pattern(split):
    return f"{split}-NNNNN-of-MMMMM"


def list_shards(data_dir, split):
    """The TFRecord shards of one split, sorted by shard number.

    Args:
        data_dir: the folder holding `train-00000-of-01024`-style files.
        split: "train" or "validation".

    Returns:
        A list of file paths.

    Raises:
        UserError: the folder is missing, has no shard of the split, or holds shards of
            two different totals (e.g. `-of-01024` and `-of-00002`).
    """
    _check_split(split)
    data_dir = os.fspath(data_dir)
    expected = (f"point --data_dir at the folder of TFRecord shards named "
                f"{_shard_pattern(split)} as written by build_imagenet_data.py")
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir={data_dir} is not a folder; {expected}.")
    name = re.compile(rf"^{split}-(\d{{5}})-of-(\d{{5}})$")
    found = []
    for entry in sorted(os.listdir(data_dir)):
        match = name.match(entry)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), entry))
    if not found:
        raise UserError(f"--data_dir={data_dir} has no {split} shards; {expected}.")
    totals = sorted({total for _, total, _ in found})
    if len(totals) > 1:
        raise UserError(f"--data_dir={data_dir} mixes {split} shards of {len(totals)} different "
                        f"totals (-of-{totals[0]:05d}, -of-{totals[1]:05d}); keep one set.")
    # A subset of the shards (a smoke run on a few of them) is allowed and read as is.
    return [os.path.join(data_dir, entry) for _, _, entry in sorted(found)]


def _count_records(shards, data_dir):
    """Records in all `shards`, one shard at a time so that a damaged one is named."""
    total = 0
    for shard in shards:
        ds = tf.data.TFRecordDataset(shard, buffer_size=_READ_BUFFER_BYTES)
        try:
            total += int(ds.reduce(np.int64(0), lambda count, _: count + 1))
        except tf.errors.DataLossError as e:
            raise _damaged_shard(shard, data_dir, e) from None
    return total


def num_examples(source, split):
    """The number of examples in a split.

    TFRecords: ImageNet's known sizes (1,281,167 train, 50,000 validation) when the folder
    holds the complete standard set of 1024 / 128 shards, else the records counted once
    (reads every shard). tfds: the size recorded in the dataset info, or, where none is
    recorded (`tfds.testing.mock_data`), the examples counted once.

    Args:
        source: a `Source`.
        split: "train" or "validation".

    Returns:
        An int.
    """
    _check_split(split)
    if source.kind == "tfrecord":
        shards = list_shards(source.data_dir, split)
        if (len(shards) == STANDARD_SHARDS[split]
                and shards[0].endswith(f"-of-{STANDARD_SHARDS[split]:05d}")):
            return NUM_EXAMPLES[split]
        return _count_records(shards, source.data_dir)
    builder = _tfds_builder(source)
    try:
        if builder.is_prepared():
            return int(builder.info.splits[split].num_examples)
    except KeyError:
        pass
    ds = _tfds_records(source, split)
    return int(ds.reduce(np.int64(0), lambda count, _: count + 1))


# --------------------------------------------------------------------------- tfds


def _tfds_builder(source):
    # Imported here: it takes seconds, and readers of TFRecords never need it.
    import tensorflow_datasets as tfds

    return tfds.builder(TFDS_NAME, data_dir=source.tfds_data_dir)


def manual_dir(builder):
    """The folder where tensorflow-datasets looks for the ImageNet archives."""
    return os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")


def _prepare(builder):
    """Prepares imagenet2012 from the manually downloaded archives, or says where they go."""
    import tensorflow_datasets as tfds

    folder = manual_dir(builder)
    missing = [name for name in MANUAL_ARCHIVES
               if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(
            f"ImageNet is not prepared in the tensorflow-datasets data dir "
            f"{builder.data_dir_root} (--tfds_data_dir) and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not in {folder}; download "
            f"{' and '.join(MANUAL_ARCHIVES)} from https://image-net.org (registration needed) "
            f"into {folder}, or pass --data_dir at a folder of TFRecord shards "
            f"(train-00000-of-01024, ...).")
    # ImageNet is not on tfds' Cloud Storage mirror; looking there only costs retries.
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    builder.download_and_prepare(download_config=config)


def _tfds_records(source, split, shuffle_seed=None, input_context=None):
    """(JPEG bytes, int64 label) examples of a tfds split, preparing it first if need be.

    The image stays encoded (`SkipDecoding`) so that training decodes only its crop window.
    """
    import tensorflow_datasets as tfds

    builder = _tfds_builder(source)
    config = tfds.ReadConfig(shuffle_seed=shuffle_seed, input_context=input_context,
                             interleave_cycle_length=CYCLE_LENGTH)
    kwargs = dict(split=split, as_supervised=True, shuffle_files=shuffle_seed is not None,
                  decoders={"image": tfds.decode.SkipDecoding()}, read_config=config)
    try:
        # Reading first (rather than asking is_prepared()) lets whatever tfds can already
        # serve, a prepared copy or tfds.testing.mock_data, load without any preparation.
        ds = builder.as_dataset(**kwargs)
    except AssertionError:
        # tfds signals "not downloaded and prepared" with an AssertionError.
        if builder.is_prepared():
            raise
        _prepare(builder)
        ds = builder.as_dataset(**kwargs)
    return ds.map(lambda image, label: _checked_record(image, tf.cast(label, tf.int64), 0))


# ---------------------------------------------------------------------- TFRecords


def _read_shard(shard, buffer_size=_READ_BUFFER_BYTES):
    """(shard path, record index, serialized record) of every record of one shard."""
    records = tf.data.TFRecordDataset(shard, buffer_size=buffer_size)
    # zip, not enumerate().map(): no function to set up per shard (5x faster to open one).
    return tf.data.Dataset.zip(tf.data.Dataset.from_tensors(shard).repeat(),
                               tf.data.Dataset.counter(), records)


def _parse(offset):
    """shard, index, record -> (JPEG bytes, 0-based label), checked by `_checked_record`."""
    def parse(shard, index, record):
        example = tf.io.parse_single_example(record, _FEATURES)
        return _checked_record(example["image/encoded"], example["image/class/label"], offset,
                               shard, index)

    return parse


def _tfrecord_records(source, split, shuffle_seed=None, input_context=None):
    """(JPEG bytes, int64 label) examples of the TFRecord shards, labels made 0-based."""
    shards = list_shards(source.data_dir, split)
    files = tf.data.Dataset.from_tensor_slices(shards)
    per_file = (input_context is not None
                and len(shards) >= input_context.num_input_pipelines > 1)
    if per_file:
        # Each input pipeline (worker) reads its own shards.
        files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle_seed is None:
        # Evaluation keeps the file order: one shard after the other. Decoding, not
        # reading, is the bottleneck, and it runs in parallel in the map that follows.
        ds = files.flat_map(_read_shard)
    else:
        files = files.shuffle(len(shards), seed=shuffle_seed, reshuffle_each_iteration=True)
        # deterministic=True: with a fixed seed the record order must not depend on which
        # reader thread finishes first.
        ds = files.interleave(_read_shard, cycle_length=min(CYCLE_LENGTH, len(shards)),
                              block_length=1, num_parallel_calls=AUTOTUNE, deterministic=True)
    if input_context is not None and input_context.num_input_pipelines > 1 and not per_file:
        # Fewer shards than input pipelines: split the records instead.
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return ds.map(_parse(source.label_offset), num_parallel_calls=AUTOTUNE)


# -------------------------------------------------------------------- record checks

# A record's problem: `jpeg.problem`'s codes for its image, then these two for its label.
NO_LABEL, LABEL_OUT_OF_RANGE = 5, 6
RECORD_ERROR = "dml_tf: bad ImageNet record"
_RECORD_ERROR_FIELDS = re.compile(
    rf"{RECORD_ERROR} <<\] \[(.*)\] \[>>\] \[(-?\d+)\] \[(\d+)\] \[(-?\d+)\]", re.S)


def _checked_record(image_bytes, stored_label, offset, shard="", index=-1):
    """(image bytes, stored_label - offset), checked as they are read, before decoding.

    An assertion fails for an image that is missing, empty, not a JPEG or truncated
    (`jpeg.problem`) and for a label that is missing or outside 0..999; its message carries
    `RECORD_ERROR`, the shard, the record index, the problem and the stored label, which
    `record_error` turns into one sentence.

    Args:
        image_bytes: scalar string tensor, `image/encoded`.
        stored_label: int64 scalar, the label as stored (`_NO_LABEL` when absent).
        offset: subtracted from the stored label (`Source.label_offset`; 0 for tfds).
        shard: the shard's path ("" for tfds, whose records have no file of their own).
        index: the record's position in its shard, from 0 (-1 for tfds).
    """
    code = _record_problem(image_bytes, stored_label, offset)
    # Explicit: inside tf.data's graph functions a bare Assert need not run.
    with tf.control_dependencies([tf.debugging.Assert(
            tf.equal(code, jpeg.OK),
            [f"{RECORD_ERROR} <<", shard, ">>", tf.cast(index, tf.int64), code, stored_label])]):
        return tf.identity(image_bytes), tf.identity(stored_label - offset)


def _record_problem(image_bytes, stored_label, offset):
    """`jpeg.OK` or what is wrong with records (elementwise): a `jpeg.problem` code for the
    image, else `NO_LABEL` or `LABEL_OUT_OF_RANGE` (stored_label - offset outside 0..999)."""
    stored_label = tf.convert_to_tensor(stored_label, tf.int64)
    label = stored_label - offset
    code = jpeg.problem(image_bytes)
    code = tf.where(tf.equal(code, jpeg.OK) & tf.equal(stored_label, _NO_LABEL), NO_LABEL, code)
    return tf.where(tf.equal(code, jpeg.OK) & ((label < 0) | (label >= NUM_CLASSES)),
                    LABEL_OUT_OF_RANGE, code)


def _problem_words(code, stored_label, source):
    """What is wrong with a record, and what to do, for `record_error`."""
    fix = (f"rebuild that shard with build_imagenet_data.py or remove it from {source.data_dir}"
           if source.kind == "tfrecord" else "re-prepare the dataset")
    if code == jpeg.EMPTY:
        return f"it has no image/encoded (or an empty one); {fix}"
    if code in (jpeg.PNG, jpeg.NOT_JPEG, jpeg.TRUNCATED):
        return f"its image/encoded {jpeg.PROBLEMS[code]}; {fix}"
    if code == NO_LABEL:
        return f"it has no image/class/label; {fix}"
    if source.kind == "tfds":
        return (f"its label {stored_label} is outside ImageNet's class indices "
                f"0..{NUM_CLASSES - 1}; {fix}")
    offset = source.label_offset
    return (f"its label {stored_label - offset} (image/class/label {stored_label} minus "
            f"label_offset={offset}) is outside ImageNet's class indices 0..{NUM_CLASSES - 1}; "
            f"build_imagenet_data.py labels are 1..1000 (label_offset=1), shards with 0-based "
            f"labels need label_offset=0")


def record_error(error, source):
    """The one-sentence UserError for a failed record check or a damaged shard, or None.

    Args:
        error: a `tf.errors.OpError` raised while reading a pipeline of `source`.
        source: the `Source` the pipeline reads.

    Returns:
        A UserError naming the shard and record (TFRecords) or the tfds folder, what is
        wrong and what to do; for a TFRecord read error (a shard cut short, which the
        pipeline's message does not name), the folder and how to find the shard; None
        for other errors.
    """
    if isinstance(error, tf.errors.DataLossError) and source.kind == "tfrecord":
        return UserError(f"A TFRecord shard in {source.data_dir} is damaged (TensorFlow: "
                         f"{_tf_reason(error)}); dml_tf.data.imagenet.check_shards(Source("
                         f"data_dir=...), every_record=True) names it, then rebuild it with "
                         f"build_imagenet_data.py or remove it.")
    match = _RECORD_ERROR_FIELDS.search(error.message)
    if match is None:
        return None
    shard, index, code, stored_label = match.group(1), *map(int, match.groups()[1:])
    if shard:
        where = f"{shard}, record {index} (from 0)"
    else:
        where = (f"A record of tensorflow-datasets {TFDS_NAME} in "
                 f"{_tfds_builder(source).data_dir_root}")
    return UserError(f"{where}: {_problem_words(code, stored_label, source)}.")


def _tf_reason(error):
    """The last line of TensorFlow's message, without its function, node and op names (a
    graph's error adds the Python stack where the op was built)."""
    message = re.sub(r"\{\{function_node [^}]*\}\}|\s*\[\[\{\{node [^]]*\]\]", "",
                     error.message)
    message = re.sub(r"\s*\[Op:.*", "", message, flags=re.S).strip()
    return message.splitlines()[-1].strip().rstrip(".") if message else type(error).__name__


def _damaged_shard(shard, data_dir, error):
    return UserError(f"{shard} is not a complete TFRecord file (TensorFlow: {_tf_reason(error)}); "
                     f"rebuild it with build_imagenet_data.py or remove it from {data_dir}.")


def check_shards(source, every_record=False):
    """Reads every TFRecord shard of both splits and names the first bad one.

    By default only each shard's first record: a file that is not a TFRecord file, an
    empty shard, or a first record that fails the checks of the pipelines (e.g. a shard
    of another dataset) is found in one pass of a few milliseconds per shard;
    `ImagenetTask` runs it before training. With `every_record`, every record is read and
    checked (a pass over all the data without decoding), which also finds a shard
    truncated in the middle.

    Args:
        source: a `Source` of TFRecords.
        every_record: read every record instead of the first of each shard.

    Raises:
        UserError: a split has no shards, or a shard is empty, not a (complete) TFRecord
            file, or holds a record that fails the checks; one sentence naming the shard
            (and the record).
    """
    limit = -1 if every_record else 1
    for split in SPLITS:
        shards = list_shards(source.data_dir, split)
        # One pipeline for all shards: a dataset per shard costs milliseconds to set up.
        records = tf.data.Dataset.from_tensor_slices(shards).flat_map(
            lambda shard: _read_shard(shard, buffer_size=1 << 18).take(limit))
        seen = set()
        try:
            for batch in records.batch(256):
                seen.update(_check_records(source, *(t.numpy() for t in batch)))
        except tf.errors.DataLossError as e:
            raise _find_damaged_shard(shards, limit, source.data_dir, e) from None
        for shard in shards:
            if shard.encode() not in seen:
                raise UserError(f"{shard} holds no records; rebuild it with "
                                f"build_imagenet_data.py or remove it from {source.data_dir}.")


def _check_records(source, shards, indices, records):
    """The pipelines' checks of a batch of serialized records; returns the shards seen."""
    try:
        example = tf.io.parse_example(records, _FEATURES)
    except tf.errors.InvalidArgumentError:
        for shard, index, record in zip(shards, indices, records):
            try:
                tf.io.parse_single_example(record, _FEATURES)
            except tf.errors.InvalidArgumentError as e:
                raise UserError(f"{shard.decode()}, record {index} (from 0): it is not a "
                                f"tf.train.Example with ImageNet's features (TensorFlow: "
                                f"{_tf_reason(e)}); rebuild that shard with "
                                f"build_imagenet_data.py or remove it from "
                                f"{source.data_dir}.") from None
        raise
    labels = example["image/class/label"].numpy()
    codes = _record_problem(example["image/encoded"], labels, source.label_offset).numpy()
    bad = np.flatnonzero(codes != jpeg.OK)
    if bad.size:
        i = bad[0]
        raise UserError(f"{shards[i].decode()}, record {indices[i]} (from 0): "
                        f"{_problem_words(int(codes[i]), int(labels[i]), source)}.")
    return set(shards.tolist())


def _find_damaged_shard(shards, limit, data_dir, error):
    """The UserError naming the shard behind a DataLossError of a pipeline over `shards`."""
    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def read(shard):  # traced once for all the shards
        return tf.data.TFRecordDataset(shard).take(limit).reduce(np.int64(0), lambda n, _: n + 1)

    for shard in shards:
        try:
            read(shard)
        except tf.errors.DataLossError as e:
            return _damaged_shard(shard, data_dir, e)
    return UserError(f"A TFRecord shard in {data_dir} is damaged (TensorFlow: "
                     f"{_tf_reason(error)}); rebuild it with build_imagenet_data.py.")


def _records(source, split, shuffle_seed=None, input_context=None):
    if source.kind == "tfrecord":
        return _tfrecord_records(source, split, shuffle_seed, input_context)
    return _tfds_records(source, split, shuffle_seed, input_context)


# ------------------------------------------------------------------ preprocessing


def scale(images):
    """Pixel values [0, 255] -> [-1, 1], as float32 (Keras MobileNet / Inception inputs)."""
    return tf.cast(images, tf.float32) / 127.5 - 1.0


def sample_crop_window(image_shape, seed):
    """Draws the Inception-style random crop window of one image.

    Args:
        image_shape: int [3] (height, width, channels), e.g. `tf.io.extract_jpeg_shape`.
        seed: int32/int64 [2] stateless seed.

    Returns:
        int32 [4] (offset_y, offset_x, height, width), inside the image, of area 8%..100%
        (and at least 10%) of the image and aspect ratio (width / height) 3/4..4/3 up to
        integer rounding; the whole image when no such window was found in 100 attempts.
    """
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.cast(image_shape, tf.int32), bounding_boxes=whole_image, seed=seed,
        min_object_covered=MIN_OBJECT_COVERED, aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE, max_attempts=MAX_ATTEMPTS, use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def train_preprocess(image_bytes, seed, image_size=IMAGE_SIZE):
    """Random resized crop, random flip, [-1, 1] of one JPEG image.

    Args:
        image_bytes: scalar string tensor, a JPEG image.
        seed: int [2] stateless seed; the crop and the flip use independent seeds split
            from it.
        image_size: side of the square output.

    Returns:
        float32 [image_size, image_size, 3] in [-1, 1].
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    window = sample_crop_window(tf.io.extract_jpeg_shape(image_bytes), crop_seed)
    image = tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.ensure_shape(scale(image), [image_size, image_size, 3])


def resize_and_center_crop(images, image_size=IMAGE_SIZE):
    """Resizes the shorter side to image_size / 0.875 and crops the central square.

    Bilinear, half-pixel centres (`tf.image.resize`), no antialiasing; the longer side
    keeps the aspect ratio (rounded to whole pixels); the crop starts at
    floor((side - image_size) / 2) on each axis.

    Args:
        images: [H, W, C] or [B, H, W, C] tensor in pixel units (any real or int dtype).
        image_size: side of the square output.

    Returns:
        float32 [..., image_size, image_size, C], pixel units.
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    height, width = shape[-3], shape[-2]
    resize_side = tf.constant(int(round(image_size / CROP_FRACTION)), tf.float64)
    shorter = tf.cast(tf.minimum(height, width), tf.float64)
    new_height = tf.cast(tf.round(tf.cast(height, tf.float64) * resize_side / shorter), tf.int32)
    new_width = tf.cast(tf.round(tf.cast(width, tf.float64) * resize_side / shorter), tf.int32)
    resized = tf.image.resize(images, tf.stack([new_height, new_width]), method="bilinear")
    top = (new_height - image_size) // 2
    left = (new_width - image_size) // 2
    cropped = resized[..., top:top + image_size, left:left + image_size, :]
    # The slice bounds are tensors; the static shape lets serving signatures and Keras
    # models see [..., image_size, image_size, C].
    cropped.set_shape(images.shape[:-3].concatenate([image_size, image_size, images.shape[-1]]))
    return cropped


def preprocess_uint8(images, image_size=IMAGE_SIZE):
    """The evaluation transform on decoded pixels: resize, centre crop, [-1, 1].

    The same function as the evaluation pipeline applies after decoding, for serving
    signatures that take uint8 images, so a model sees identically prepared pixels.

    Args:
        images: uint8 (or any real dtype, pixel units) [H, W, 3] or [B, H, W, 3].
        image_size: side of the square output, an int or an (S, S) pair.

    Returns:
        float32 [..., image_size, image_size, 3] in [-1, 1].
    """
    return scale(resize_and_center_crop(images, image_side(image_size)))


def eval_preprocess(image_bytes, image_size=IMAGE_SIZE):
    """Decodes one JPEG image and applies `preprocess_uint8`."""
    image = tf.io.decode_jpeg(image_bytes, channels=3)
    return tf.ensure_shape(preprocess_uint8(image, image_size), [image_size, image_size, 3])


# ---------------------------------------------------------------------- pipelines


def image_side(image_size):
    """The side of the square images from an int or an (H, W) pair with H == W.

    Raises:
        UserError: a pair with H != W (the centre crop is square).
    """
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise UserError(f"--image_size={','.join(map(str, image_size))} must be square "
                            f"for ImageNet (e.g. 224).")
        image_size = image_size[0]
    return int(image_size)


def _check_batch(batch_size, flag):
    if batch_size < 1:
        raise UserError(f"{flag}={batch_size} must be at least 1.")


def train_dataset(source, batch_size, seed, image_size=IMAGE_SIZE, *,
                  shuffle_buffer=SHUFFLE_BUFFER, input_context=None):
    """The training pipeline: one epoch of shuffled, randomly cropped and flipped batches.

    TFRecords: shard list shuffled, `CYCLE_LENGTH` shards read in parallel (interleave),
    records shuffled in a buffer, parsed, cropped/flipped/scaled in parallel, batched,
    prefetched. tfds: its own shuffled, interleaved read, then the same steps.

    Args:
        source: a `Source`.
        batch_size: examples per batch (under `distribute_datasets_from_function`, the
            per-replica batch); the last partial batch is dropped, so every batch has the
            static shape [batch_size, image_size, image_size, 3] and a train step compiles
            once.
        seed: int seed of the shard order, the shuffle and the crops and flips.
        image_size: side of the square training images (224 in the paper), an int or an
            (S, S) pair such as `config.image_size`.
        shuffle_buffer: serialized examples held for shuffling.
        input_context: optional `tf.distribute.InputContext`: each input pipeline then
            reads its own part of the shards (or of the records, with fewer shards than
            pipelines).

    Returns:
        A `tf.data.Dataset` of (float32 [B, S, S, 3] in [-1, 1], int64 [B] labels 0..999);
        each new iterator is a new epoch with a new order and new crops.

    Raises:
        UserError: bad batch size, missing shards, or tfds ImageNet neither prepared nor
            preparable (the archives are not in its manual folder).
    """
    _check_batch(batch_size, "--batch_size")
    image_size = image_side(image_size)
    ds = _records(source, "train", shuffle_seed=seed, input_context=input_context)
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    # One [2] int64 stateless seed per example, a new deterministic stream each epoch.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def transform(example, example_seed):
        image_bytes, label = example
        return train_preprocess(image_bytes, example_seed, image_size), label

    ds = tf.data.Dataset.zip((ds, seeds)).map(transform, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def eval_dataset(source, batch_size, image_size=IMAGE_SIZE, *, input_context=None):
    """The evaluation pipeline: the validation split in order, every example once.

    Decode, resize the shorter side to image_size / 0.875, centre crop, [-1, 1], batch
    (the last batch keeps the remainder), prefetch.

    Args:
        source: a `Source`.
        batch_size: examples per batch.
        image_size: side of the square images (224 in the paper), an int or an (S, S) pair.
        input_context: optional `tf.distribute.InputContext`; each pipeline then reads
            its own part, and together they cover every example once.

    Returns:
        A `tf.data.Dataset` of (float32 [B, S, S, 3] in [-1, 1], int64 [B] labels 0..999).

    Raises:
        UserError: as `train_dataset`.
    """
    _check_batch(batch_size, "--eval_batch_size")
    image_size = image_side(image_size)
    ds = _records(source, "validation", input_context=input_context)
    ds = ds.map(lambda image_bytes, label: (eval_preprocess(image_bytes, image_size), label),
                num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size).prefetch(AUTOTUNE)
