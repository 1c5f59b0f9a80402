"""Market-1501 person re-identification: the on-disk layout, file names, tf.data pipelines.

Layout of the extracted `Market-1501-v15.09.15` archive (Zheng et al., ICCV 2015), as read
here:
  bounding_box_train/  training: 12,936 images of 751 identities
  bounding_box_test/   gallery: 19,732 images of the 750 test identities, plus distractors
                       (identity 0000) and junk (identity -1)
  query/               3,368 hand-drawn boxes of the test identities
  gt_bbox/             hand-drawn boxes of every identity: the multi-query images
  gt_query/            the MATLAB evaluation's index files; not read, since the protocol
                       follows from the file names (dml_tf.evaluation.reid)
Folders hold `.jpg` files and, as shipped, a Windows `Thumbs.db`. Every file with an image
extension (`.jpg` in any case, `.jpeg`, `.png`, ...) is read or refused by name, never
skipped; other files are ignored. An image's name carries its labels:
`0002_c1s1_000451_03.jpg` is identity 0002, camera 1, sequence 1, frame 000451, box 03.
`scan` also reads every image's bytes (about 1.5 s for the 36,000 files once cached) so that
an empty file, a PNG under a `.jpg` name or a truncated JPEG in any split is named before
training starts, not when the evaluation first decodes it after an epoch (`check_files`).

Pipelines follow the authors' released code: decode the JPEG, resize (bilinear) to
224x224, flip horizontally at random for training, scale to [-1, 1]. `preprocess` is the
resize-and-scale step alone, for serving signatures, so that both see the same inputs.
The released TF1 code resized with the legacy corner alignment; TF2's `tf.image.resize`
samples at pixel centres, a sub-pixel difference.
"""

import os
import re
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from dml_tf.data import jpeg
from dml_tf.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE
DATASET_FOLDER = "Market-1501-v15.09.15"
IMAGE_SIZE = (224, 224)  # released code: Market's 128x64 boxes resized to 224x224
JUNK = -1
DISTRACTOR = 0
CAMERAS = range(1, 7)  # Market-1501's six cameras, c1..c6
# Split name -> folder. "multiquery" is optional: scan leaves it out if gt_bbox is absent.
SPLITS = {
    "train": "bounding_box_train",
    "query": "query",
    "gallery": "bounding_box_test",
    "multiquery": "gt_bbox",
}
OPTIONAL_SPLITS = ("multiquery",)

# The archive's names end in .jpg; a copy through some tools upper-cases it, which changes
# nothing about the image.
_NAME = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.(?i:jpg)$")
# Files that are images by name: read if named .jpg, else refused, so that none is skipped.
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
                   ".webp")
_WHERE = (f"point --data_dir at the extracted {DATASET_FOLDER} folder (or the folder that "
          f"contains it)")


class Split(NamedTuple):
    """The images of one split, sorted by file name.

    Attributes:
        paths: str [N] array of file paths.
        pids: int64 [N] identities (-1 junk, 0 distractor, otherwise the 4-digit id).
        camids: int64 [N] cameras (1..6 in Market-1501).
    """

    paths: np.ndarray
    pids: np.ndarray
    camids: np.ndarray


def parse_filename(name):
    """Identity and camera of a Market-1501 image from its file name.

    Args:
        name: a file name such as `0002_c1s1_000451_03.jpg`, or a path to one (only the
            base name is read).

    Returns:
        (pid, camid) as ints: `0002_c1s1_000451_03.jpg` -> (2, 1); junk `-1_...` -> -1;
        distractors `0000_...` -> 0.

    Raises:
        UserError: the name is not of that form, or its camera is not one of c1..c6; the
            message names the file.
    """
    match = _NAME.match(os.path.basename(os.fspath(name)))
    if not match:
        raise UserError(f"{os.fspath(name)} is not a Market-1501 image name like "
                        f"0002_c1s1_000451_03.jpg (identity_cCAMERAsSEQUENCE_FRAME_BOX.jpg); "
                        f"remove or rename it.")
    pid, camid = int(match.group(1)), int(match.group(2))
    if camid not in CAMERAS:
        raise UserError(f"{os.fspath(name)} names camera c{camid}, but Market-1501's cameras are "
                        f"c1..c6; remove or rename it.")
    return pid, camid


def find_root(root):
    """The folder holding the split folders: `root` itself or its `Market-1501-v15.09.15`.

    Raises:
        UserError: `root` is not a folder.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder; {_WHERE}.")
    nested = os.path.join(root, DATASET_FOLDER)
    if not os.path.isdir(os.path.join(root, SPLITS["train"])) and os.path.isdir(nested):
        return nested
    return root


def _scan_folder(folder):
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is missing; {_WHERE}.")
    with os.scandir(folder) as entries:
        paths = sorted(e.path for e in entries
                       # not is_dir: a dangling link is named when it is read, not skipped
                       if e.name.lower().endswith(_IMAGE_SUFFIXES) and not e.is_dir())
    for path in paths:
        suffix = os.path.splitext(path)[1]
        if suffix.lower() != ".jpg":
            raise UserError(f"{path} is a {suffix} file, but Market-1501's images are JPEG files "
                            f"named .jpg; convert it to a .jpg JPEG or remove it.")
    if not paths:
        raise UserError(f"{folder} has no .jpg images; re-extract the Market-1501 archive there.")
    labels = np.array([parse_filename(p) for p in paths], dtype=np.int64).reshape(-1, 2)
    return Split(np.array(paths), labels[:, 0], labels[:, 1])


def scan(root):
    """Lists the images of every split with their identities and cameras.

    Args:
        root: the extracted `Market-1501-v15.09.15` folder, or the folder containing it.

    Returns:
        A dict split name -> `Split(paths, pids, camids)`, paths sorted by name, for
        "train" (bounding_box_train), "query" (query), "gallery" (bounding_box_test) and,
        when the gt_bbox folder exists, "multiquery" (gt_bbox).

    Raises:
        UserError: `root` or a required split folder is missing, a split has no images, an
            image file is not a `.jpg` named like a Market-1501 image, bounding_box_train or
            query holds junk or distractor images, no query can be scored (see
            `_check_queries`), or an image is empty, not a JPEG or truncated (see
            `check_files`); each message names the path.
    """
    root = find_root(root)
    splits = {}
    for split, folder in SPLITS.items():
        path = os.path.join(root, folder)
        if split in OPTIONAL_SPLITS and not os.path.exists(path):
            continue
        splits[split] = _scan_folder(path)
    for split in ("train", "query"):
        bad = np.flatnonzero(splits[split].pids <= DISTRACTOR)
        if bad.size:
            raise UserError(f"{splits[split].paths[bad[0]]} is a junk (-1) or distractor (0000) "
                            f"image, which {SPLITS[split]} must not contain; remove it.")
    _check_queries(splits["query"], splits["gallery"], root)
    check_files(np.concatenate([split.paths for split in splits.values()]))
    return splits


def _check_queries(query, gallery, root):
    """Refuses a query/gallery pair that the protocol cannot score at all.

    The protocol (dml_tf.evaluation.reid) ignores gallery images of the query's identity
    under the query's own camera and skips queries left without a correct match, as the
    benchmark does; when every query is skipped, mAP and CMC are undefined (0 / 0).
    """
    cameras = {}
    for pid, camid in zip(gallery.pids.tolist(), gallery.camids.tolist()):
        cameras.setdefault(pid, set()).add(camid)
    if not any(cameras.get(pid, set()) - {camid}
               for pid, camid in zip(query.pids.tolist(), query.camids.tolist())):
        raise UserError(f"No image of {os.path.join(root, SPLITS['query'])} (the first, "
                        f"{os.path.basename(query.paths[0])}, is identity {int(query.pids[0])}) "
                        f"has an image of its identity under another camera in "
                        f"{os.path.join(root, SPLITS['gallery'])}, so the protocol would skip "
                        f"every query and mAP would be undefined; both folders must come from "
                        f"the same Market-1501 archive.")


def relabel(pids):
    """Maps training identities to consecutive class labels.

    Args:
        pids: int [N] identities, all positive (Market-1501's 751 training identities).

    Returns:
        (labels, identities): int64 [N] labels in 0..n-1 and the int64 [n] sorted unique
        identities, so that `identities[labels] == pids`.

    Raises:
        UserError: a junk (-1) or distractor (0) identity is among `pids`.
    """
    pids = np.asarray(pids, dtype=np.int64).reshape(-1)
    if (pids <= DISTRACTOR).any():
        raise UserError(f"training identities must be positive, but identity "
                        f"{int(pids[pids <= DISTRACTOR][0])} (junk -1 or distractor 0) is among "
                        f"them; train on bounding_box_train only.")
    identities, labels = np.unique(pids, return_inverse=True)
    return labels.reshape(-1).astype(np.int64), identities


def preprocess(images, image_size=IMAGE_SIZE):
    """Resizes (bilinear) and scales pixel values from [0, 255] to [-1, 1].

    The same function serves the training and evaluation pipelines and the exported
    serving signature, so a model sees identically prepared pixels everywhere.

    Args:
        images: [H, W, 3] or [B, H, W, 3] tensor in pixel units (typically uint8).
        image_size: (height, width) of the output.

    Returns:
        float32 tensor [..., height, width, 3] in [-1, 1].
    """
    images = tf.image.resize(images, image_size, method="bilinear")  # float32, 0..255
    return images / 127.5 - 1.0


def decode(path):
    """Reads one JPEG file into a uint8 [H, W, 3] tensor.

    A file that is empty, not a JPEG or truncated (`dml_tf.data.jpeg.problem`) fails with
    an error that names the path; a JPEG damaged inside fails in `tf.io.decode_jpeg` with
    TensorFlow's own message, which does not: run `check_images` to find such a file.
    """
    contents = tf.io.read_file(path)
    code = jpeg.problem(contents)
    # Explicit: inside tf.data's graph functions a bare Assert need not run before decoding.
    with tf.control_dependencies([tf.debugging.Assert(
            tf.equal(code, jpeg.OK), ["Market-1501 image", path, jpeg.describe(code)])]):
        return tf.io.decode_jpeg(contents, channels=3)


def _check_batch(n, batch_size, flag):
    if n == 0:
        raise ValueError("no images to read.")
    if batch_size < 1:
        raise UserError(f"{flag}={batch_size} must be at least 1.")


def train_dataset(paths, labels, batch_size, seed, image_size=IMAGE_SIZE, flip=True):
    """The training pipeline: whole-set shuffle, decode, resize, random flip, [-1, 1].

    The shuffle and the flips are seeded: the same seed gives the same batches, and each
    epoch (each new iterator) draws a new order and new flips.

    Args:
        paths: str [N] image paths (e.g. `scan(root)["train"].paths`).
        labels: int [N] class labels (e.g. from `relabel`).
        batch_size: images per batch; the last partial batch is dropped, so every batch has
            the static shape [batch_size, height, width, 3] and a train step compiles once.
        seed: int seed of the shuffle and the flips.
        image_size: (height, width) the images are resized to.
        flip: whether to mirror each image horizontally with probability 1/2.

    Returns:
        A `tf.data.Dataset` of (float32 [B, height, width, 3] in [-1, 1], int64 [B]).

    Raises:
        UserError: the batch size is not positive or exceeds the number of images.
    """
    paths = np.asarray(paths, dtype=str)
    labels = np.asarray(labels, dtype=np.int64)
    if paths.shape != labels.shape or paths.ndim != 1:
        raise ValueError(f"need one label per path, got {paths.shape} paths and "
                         f"{labels.shape} labels.")
    _check_batch(len(paths), batch_size, "--batch_size")
    if batch_size > len(paths):
        raise UserError(f"--batch_size={batch_size} is larger than the {len(paths)} training "
                        f"images, so an epoch would have no full batch; lower --batch_size.")
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    # Shuffling names, not pixels, keeps the whole-set shuffle buffer small.
    ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    # One [2] int64 stateless seed per image, a new deterministic stream each epoch.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def load(example, flip_seed):
        path, label = example
        image = decode(path)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return preprocess(image, image_size), label

    ds = tf.data.Dataset.zip((ds, seeds)).map(load, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def eval_dataset(paths, batch_size, image_size=IMAGE_SIZE, with_index=False):
    """The evaluation pipeline: decode, resize, [-1, 1], in order, every image once.

    Args:
        paths: str [N] image paths (e.g. `scan(root)["query"].paths`).
        batch_size: images per batch; the last batch keeps the remainder.
        image_size: (height, width) the images are resized to.
        with_index: also yield each image's int64 position in `paths`.

    Returns:
        A `tf.data.Dataset` of float32 [B, height, width, 3] batches in [-1, 1], or of
        (images, int64 [B] indices) with `with_index`.
    """
    paths = np.asarray(paths, dtype=str).reshape(-1)
    _check_batch(len(paths), batch_size, "--eval_batch_size")
    ds = tf.data.Dataset.from_tensor_slices((paths, np.arange(len(paths), dtype=np.int64)))

    def load(path, index):
        image = preprocess(decode(path), image_size)
        return (image, index) if with_index else image

    ds = ds.map(load, num_parallel_calls=AUTOTUNE).batch(batch_size)
    return ds.prefetch(AUTOTUNE)


def _bad_file(path, code):
    return UserError(f"{path} {jpeg.PROBLEMS[code]}; replace it with the image from the "
                     f"Market-1501 archive (re-extract it).")


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); check that it exists and is "
                        f"readable.") from None


_CHECK_BATCH = 4096  # files per call of jpeg.problem: about 10 MB of Market crops


def check_files(paths):
    """Reads every file once and names the first that is empty, not a JPEG or truncated.

    The cheap check `scan` runs on every split: the bytes' markers only, no decoding
    (`dml_tf.data.jpeg.problem`), a few thousand files per call. Python reads the files:
    on 36,000 Market crops `tf.io.read_file` in a parallel tf.data map took five times as
    long.

    Args:
        paths: image paths.

    Raises:
        UserError: a file cannot be read, is empty, is not a JPEG (a PNG is named as such)
            or is truncated; the message names the first such file.
    """
    paths = np.asarray(paths, dtype=str).reshape(-1)
    for start in range(0, len(paths), _CHECK_BATCH):
        batch = paths[start:start + _CHECK_BATCH]
        codes = jpeg.problem(tf.constant([_read(p) for p in batch], tf.string)).numpy()
        bad = np.flatnonzero(codes != jpeg.OK)
        if bad.size:
            raise _bad_file(batch[bad[0]], int(codes[bad[0]]))


def check_images(paths):
    """Checks every file (`check_files`), then decodes every image and names the first
    that does not decode.

    A validation pass (about a millisecond per Market image) for a data check, and for the
    diagnosis of a failed pipeline: the pipelines fail on a JPEG damaged inside too, but
    TensorFlow's message does not say which file it was.

    Args:
        paths: image paths.

    Raises:
        UserError: a file fails `check_files`, or does not decode.
    """
    paths = np.asarray(paths, dtype=str).reshape(-1)
    check_files(paths)
    for path in paths:
        try:
            tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        except tf.errors.OpError as e:
            raise UserError(f"{path} cannot be read as a JPEG image ({e.message.strip()}); "
                            f"replace it with the image from the Market-1501 archive "
                            f"(re-extract it).") from None
