"""Market-1501 loading: file names, the on-disk layout, errors, and the tf.data pipelines.

The fixture writes a tiny dataset in the exact layout of the extracted archive (real JPEG
files, junk and distractors in the gallery, gt_bbox, a Thumbs.db); the five real
Market-1501 images of the project's shared data folder are read where that folder exists.
"""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from dml_tf.data import market1501
from dml_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "..", "shared", "data", "market1501_samples")
HEIGHT, WIDTH = 16, 8  # small, and taller than wide like Market's 128x64 boxes
SIZE = (12, 6)  # pipeline output size in the tests: a real (down)resize, cheap

# Split folder -> (file name, pid, camid), in sorted order.
LAYOUT = {
    "bounding_box_train": [
        ("0002_c1s1_000451_03.jpg", 2, 1),
        ("0002_c2s1_000476_01.jpg", 2, 2),
        ("0007_c1s1_000101_01.jpg", 7, 1),
        ("0007_c3s1_000201_02.jpg", 7, 3),
        ("0011_c5s2_001001_01.jpg", 11, 5),
        ("0011_c6s2_001101_01.jpg", 11, 6),
        ("0011_c6s2_001126_02.jpg", 11, 6),
    ],
    "query": [
        ("0003_c1s1_000010_00.jpg", 3, 1),
        ("0005_c2s1_000020_00.jpg", 5, 2),
    ],
    "bounding_box_test": [
        ("-1_c1s1_000050_03.jpg", -1, 1),
        ("-1_c4s2_000055_01.jpg", -1, 4),
        ("0000_c2s1_000060_04.jpg", 0, 2),
        ("0000_c5s1_000070_01.jpg", 0, 5),
        ("0003_c1s1_000011_01.jpg", 3, 1),
        ("0003_c4s1_000030_01.jpg", 3, 4),
        ("0005_c3s1_000040_02.jpg", 5, 3),
    ],
    "gt_bbox": [
        ("0002_c1s1_000451_00.jpg", 2, 1),
        ("0003_c1s1_000010_00.jpg", 3, 1),
        ("0003_c1s1_000012_00.jpg", 3, 1),
        ("0005_c2s1_000020_00.jpg", 5, 2),
    ],
}
SPLIT_OF = {"bounding_box_train": "train", "query": "query", "bounding_box_test": "gallery",
            "gt_bbox": "multiquery"}


def write_market(folder, seed=0):
    """Writes LAYOUT under `folder` as real JPEGs (random pixels) plus Thumbs.db files."""
    rng = np.random.default_rng(seed)
    for split, files in LAYOUT.items():
        os.makedirs(os.path.join(folder, split))
        for name, _, _ in files:
            pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            tf.io.write_file(os.path.join(folder, split, name),
                             tf.io.encode_jpeg(pixels, quality=95))
        with open(os.path.join(folder, split, "Thumbs.db"), "wb") as f:
            f.write(b"\xd0\xcf\x11\xe0 not an image")
    os.makedirs(os.path.join(folder, "gt_query"))  # the MATLAB index files' folder


@pytest.fixture(scope="module")
def market_parent(tmp_path_factory):
    """A folder holding an extracted Market-1501-v15.09.15 (read-only use in tests)."""
    parent = tmp_path_factory.mktemp("market")
    write_market(str(parent / market1501.DATASET_FOLDER))
    return str(parent)


@pytest.fixture(scope="module")
def market(market_parent):
    return os.path.join(market_parent, market1501.DATASET_FOLDER)


@pytest.fixture
def market_copy(market, tmp_path):
    """A private copy that a test may break."""
    copy = str(tmp_path / market1501.DATASET_FOLDER)
    shutil.copytree(market, copy)
    return copy


def reference(path, flip=False):
    """The expected pipeline output for one file: decode, (flip), resize, scale."""
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    if flip:
        image = image[:, ::-1]
    return market1501.preprocess(image, SIZE).numpy()


# --- file names ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("0002_c1s1_000451_03.jpg", (2, 1)),
    ("-1_c1s1_000401_03.jpg", (-1, 1)),
    ("0000_c6s3_094992_01.jpg", (0, 6)),
    ("1501_c6s4_001902_01.jpg", (1501, 6)),
])
def test_parse_filename(name, expected):
    assert market1501.parse_filename(name) == expected


def test_parse_filename_reads_the_base_name_of_a_path():
    assert market1501.parse_filename("/data/query/0002_c1s1_000451_03.jpg") == (2, 1)


@pytest.mark.parametrize("name", [
    "Thumbs.db",
    "0002_c1s1_000451_03.png",
    "0002_c1s1_000451_03.jpeg",
    "2_c1s1_000451_03.jpg",        # identity not 4 digits
    "00002_c1s1_000451_03.jpg",
    "-2_c1s1_000451_03.jpg",       # only -1 is junk
    "0002_c1_000451_03.jpg",       # no sequence
    "0002_c1s1_451_03.jpg",        # frame not 6 digits
    "0002_c1s1_000451_03.jpg.bak",
    "abcd_c1s1_000451_03.jpg",
])
def test_parse_filename_rejects_other_names(name):
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        market1501.parse_filename(os.path.join("some", name))


# --- scan ---------------------------------------------------------------------------------

def test_scan_returns_what_was_written(market):
    splits = market1501.scan(market)
    assert set(splits) == {"train", "query", "gallery", "multiquery"}
    for folder, files in LAYOUT.items():
        split = splits[SPLIT_OF[folder]]
        assert [os.path.basename(p) for p in split.paths] == [f[0] for f in files]
        assert all(os.path.dirname(p) == os.path.join(market, folder) for p in split.paths)
        np.testing.assert_array_equal(split.pids, [f[1] for f in files])
        np.testing.assert_array_equal(split.camids, [f[2] for f in files])
        assert split.pids.dtype == np.int64 and split.camids.dtype == np.int64
    gallery = splits["gallery"]
    assert (gallery.pids == -1).sum() == 2 and (gallery.pids == 0).sum() == 2


def test_scan_accepts_the_parent_of_the_dataset_folder(market, market_parent):
    nested, parent = market1501.scan(market), market1501.scan(market_parent)
    for split in nested:
        np.testing.assert_array_equal(nested[split].paths, parent[split].paths)


def test_scan_without_gt_bbox_has_no_multiquery(market_copy):
    shutil.rmtree(os.path.join(market_copy, "gt_bbox"))
    assert set(market1501.scan(market_copy)) == {"train", "query", "gallery"}


def test_missing_root_names_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match=f"{missing} is not a folder"):
        market1501.scan(missing)


@pytest.mark.parametrize("folder", ["bounding_box_train", "query", "bounding_box_test"])
def test_missing_split_folder_names_it(market_copy, folder):
    shutil.rmtree(os.path.join(market_copy, folder))
    with pytest.raises(UserError, match=f"{os.path.join(market_copy, folder)} is missing"):
        market1501.scan(market_copy)


def test_empty_split_names_the_folder(market_copy):
    folder = os.path.join(market_copy, "bounding_box_test")
    for name, _, _ in LAYOUT["bounding_box_test"]:
        os.remove(os.path.join(folder, name))  # Thumbs.db stays: not an image
    with pytest.raises(UserError, match=f"{folder} has no .jpg images"):
        market1501.scan(market_copy)


def test_foreign_jpg_name_is_named(market_copy):
    stray = os.path.join(market_copy, "query", "holiday photo.jpg")
    shutil.copy(os.path.join(market_copy, "query", LAYOUT["query"][0][0]), stray)
    with pytest.raises(UserError, match=f"{stray} is not a Market-1501 image name"):
        market1501.scan(market_copy)


def test_junk_in_training_folder_is_named(market_copy):
    junk = os.path.join(market_copy, "bounding_box_train", "-1_c1s1_000001_01.jpg")
    shutil.copy(os.path.join(market_copy, "query", LAYOUT["query"][0][0]), junk)
    with pytest.raises(UserError, match=f"{junk} is a junk"):
        market1501.scan(market_copy)


def test_relabel():
    labels, identities = market1501.relabel(np.array([7, 2, 11, 2, 7]))
    np.testing.assert_array_equal(labels, [1, 0, 2, 0, 1])
    np.testing.assert_array_equal(identities, [2, 7, 11])
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(identities[labels], [7, 2, 11, 2, 7])
    for bad in (-1, 0):
        with pytest.raises(UserError, match="must be positive"):
            market1501.relabel(np.array([2, bad]))


# --- pipelines ----------------------------------------------------------------------------

def test_preprocess_scales_to_minus_one_one():
    images = tf.constant(np.stack([np.zeros((HEIGHT, WIDTH, 3)), np.full((HEIGHT, WIDTH, 3), 255)])
                         .astype(np.uint8))
    out = market1501.preprocess(images, (32, 16))
    assert out.shape == (2, 32, 16, 3) and out.dtype == tf.float32
    np.testing.assert_allclose(out[0], -1.0)
    np.testing.assert_allclose(out[1], 1.0)
    single = market1501.preprocess(images[1], (32, 16))
    assert single.shape == (32, 16, 3)


def train_epochs(market, epochs, flip=True, seed=3):
    train = market1501.scan(market)["train"]
    # Label i for image i, so that every output can be traced to its file.
    ds = market1501.train_dataset(train.paths, np.arange(len(train.paths)), batch_size=2,
                                  seed=seed, image_size=SIZE, flip=flip)
    it = [[(x.numpy(), y.numpy()) for x, y in ds] for _ in range(epochs)]
    return train.paths, ds, it


def test_train_batches_have_static_shapes_and_range(market):
    paths, ds, (epoch,) = train_epochs(market, 1)
    images_spec, labels_spec = ds.element_spec
    assert images_spec.shape == (2, *SIZE, 3) and images_spec.dtype == tf.float32
    assert labels_spec.shape == (2,) and labels_spec.dtype == tf.int64
    assert len(epoch) == len(paths) // 2  # 7 images: the partial batch is dropped
    labels = np.concatenate([y for _, y in epoch])
    assert len(set(labels)) == len(labels)  # no image twice in an epoch
    images = np.concatenate([x for x, _ in epoch])
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_train_images_are_the_files_some_of_them_flipped(market):
    paths, _, epochs = train_epochs(market, 3)
    flipped = 0
    for epoch in epochs:
        for images, labels in epoch:
            for image, label in zip(images, labels):
                plain, mirror = reference(paths[label]), reference(paths[label], flip=True)
                is_plain = np.allclose(image, plain, atol=1e-5)
                is_mirror = np.allclose(image, mirror, atol=1e-5)
                assert is_plain or is_mirror
                flipped += is_mirror and not is_plain
    assert 0 < flipped < 18  # of 3 epochs x 6 images


def test_train_without_flip_is_plain(market):
    paths, _, (epoch,) = train_epochs(market, 1, flip=False)
    for images, labels in epoch:
        for image, label in zip(images, labels):
            np.testing.assert_allclose(image, reference(paths[label]), atol=1e-5)


def test_train_is_reproducible_and_reshuffles(market):
    _, _, first = train_epochs(market, 2, seed=5)
    _, _, again = train_epochs(market, 2, seed=5)
    for a, b in zip(first, again):
        for (xa, ya), (xb, yb) in zip(a, b):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa, xb)
    order = [np.concatenate([y for _, y in epoch]).tolist() for epoch in first]
    assert order[0] != order[1]


def test_train_batch_size_errors(market):
    train = market1501.scan(market)["train"]
    labels = np.zeros(len(train.paths))
    for bad in (0, len(train.paths) + 1):
        with pytest.raises(UserError, match=f"--batch_size={bad}"):
            market1501.train_dataset(train.paths, labels, bad, seed=0)


def test_eval_keeps_order_and_remainder(market):
    gallery = market1501.scan(market)["gallery"]
    ds = market1501.eval_dataset(gallery.paths, batch_size=3, image_size=SIZE)
    batches = [x.numpy() for x in ds]
    assert [len(b) for b in batches] == [3, 3, 1]
    images = np.concatenate(batches)
    for image, path in zip(images, gallery.paths):
        np.testing.assert_allclose(image, reference(path), atol=1e-5)
    indexed = market1501.eval_dataset(gallery.paths, batch_size=3, image_size=SIZE,
                                      with_index=True)
    indices = np.concatenate([i.numpy() for _, i in indexed])
    np.testing.assert_array_equal(indices, np.arange(len(gallery.paths)))


def test_a_non_jpeg_file_is_named_by_the_pipeline_and_check_images(market_copy):
    query = market1501.scan(market_copy)["query"]
    bad = query.paths[1]
    with open(bad, "wb") as f:
        f.write(b"<html>404 Not Found</html>")
    with pytest.raises(tf.errors.InvalidArgumentError, match=bad):
        list(market1501.eval_dataset(query.paths, batch_size=2, image_size=SIZE))
    with pytest.raises(UserError, match=f"{bad} is not a JPEG image"):
        market1501.check_images(query.paths)


def test_check_images_names_a_damaged_jpeg(market_copy):
    query = market1501.scan(market_copy)["query"]
    market1501.check_images(query.paths)  # all good
    bad = query.paths[0]
    with open(bad, "rb") as f:
        head = f.read(200)  # the header survives, the image data does not
    with open(bad, "wb") as f:
        f.write(head)
    with pytest.raises(UserError, match=f"{bad} cannot be read as a JPEG image"):
        market1501.check_images(query.paths)


# --- the real images ------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir(SAMPLES),
                    reason=f"the real Market-1501 samples folder {SAMPLES} is absent")
def test_real_market_images_decode_and_parse():
    names = sorted(n for n in os.listdir(SAMPLES) if n.endswith(".jpg"))
    assert len(names) == 5
    paths = [os.path.join(SAMPLES, n) for n in names]
    for name, path in zip(names, paths):
        pid, camid = market1501.parse_filename(path)
        assert pid == int(name[:4]) > 0 and camid == int(name[6]) and 1 <= camid <= 6
        assert market1501.decode(path).shape == (128, 64, 3)
    market1501.check_images(paths)
    (images,) = list(market1501.eval_dataset(paths, batch_size=8))
    assert images.shape == (5, 224, 224, 3)
    assert -1.0 <= float(tf.reduce_min(images)) < float(tf.reduce_max(images)) <= 1.0
