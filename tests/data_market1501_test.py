"""Market-1501 loading: file names, the on-disk layout, errors, and the tf.data pipelines.

The fixture writes a tiny dataset in the exact layout of the extracted archive (real JPEG
files, junk and distractors in the gallery, gt_bbox, a Thumbs.db). Five crops named and
encoded like Market-1501's (tests/fixtures/market1501_samples, synthetic, see its README)
are read as the real ones would be; real crops too where DML_TF_MARKET_SAMPLES names a
folder of them.
"""

import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from dml_tf.data import market1501
from dml_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_SAMPLES = os.path.join(ROOT, "tests", "fixtures", "market1501_samples")
# Real Market-1501 crops, where a user has them: an extra case, not collected otherwise.
REAL_SAMPLES = os.environ.get("DML_TF_MARKET_SAMPLES")
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
    ("0002_c1s1_000451_03.JPG", (2, 1)),  # a copy that upper-cased the extension
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
    with open(bad, "wb") as f:  # replaced after the scan: the pipeline names it too
        f.write(b"<html>404 Not Found</html>")
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{bad}.*is not a JPEG image"):
        list(market1501.eval_dataset(query.paths, batch_size=2, image_size=SIZE))
    with pytest.raises(UserError, match=f"{bad} is not a JPEG image"):
        market1501.check_images(query.paths)


def damaged_inside(path):
    """Rewrites a JPEG with a 12-bit precision in its frame header: complete, undecodable."""
    with open(path, "rb") as f:
        data = f.read()
    frame = data.index(b"\xff\xc0")  # SOF0: FF C0, length (2 bytes), precision (1 byte)
    with open(path, "wb") as f:
        f.write(data[:frame + 4] + b"\x0c" + data[frame + 5:])


def test_check_images_names_a_truncated_and_a_damaged_jpeg(market_copy):
    query = market1501.scan(market_copy)["query"]
    market1501.check_images(query.paths)  # all good
    bad = query.paths[0]
    with open(bad, "rb") as f:
        head = f.read(200)  # the header survives, the image data does not
    with open(bad, "wb") as f:
        f.write(head)
    for check in (market1501.check_files, market1501.check_images):
        with pytest.raises(UserError, match=f"^{bad} is a truncated JPEG"):
            check(query.paths)
    # A JPEG damaged inside passes the marker check; only decoding finds it.
    shutil.copy(query.paths[1], bad)
    damaged_inside(bad)
    market1501.check_files(query.paths)
    with pytest.raises(UserError, match=f"^{bad} cannot be read as a JPEG image"):
        market1501.check_images(query.paths)


# --- files that are not what their names say, in every split -------------------------------

def png_bytes(_):
    return tf.io.encode_png(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).numpy()


FAULTS = {  # name -> (new bytes from the old, the words of the message)
    "png named .jpg": (png_bytes, "is a PNG image, not a JPEG"),
    "empty": (lambda data: b"", r"is empty \(0 bytes\)"),
    "truncated": (lambda data: data[:len(data) // 2], r"is a truncated JPEG \(it stops before its end-of-image marker\)"),
    "html page": (lambda data: b"<html>403 Forbidden</html>", "is not a JPEG image"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("folder", sorted(LAYOUT))
def test_a_bad_image_in_any_split_is_named_by_scan(market_copy, folder, fault):
    path = os.path.join(market_copy, folder, LAYOUT[folder][-1][0])
    rewrite, words = FAULTS[fault]
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(rewrite(data))
    with pytest.raises(UserError) as err:
        market1501.scan(market_copy)
    message = str(err.value)
    assert re.match(f"{re.escape(path)} {words}; replace it with the image from the Market-1501 "
                    f"archive", message), message
    assert message.count(". ") == 0 and message.endswith(".")


def test_upper_case_jpg_files_are_read_not_skipped(market_copy):
    folder = os.path.join(market_copy, "bounding_box_train")
    renamed = {"0007_c1s1_000101_01.jpg": "0007_c1s1_000101_01.JPG",
               "0011_c6s2_001126_02.jpg": "0011_c6s2_001126_02.Jpg"}
    for old, new in renamed.items():
        os.rename(os.path.join(folder, old), os.path.join(folder, new))
    train = market1501.scan(market_copy)["train"]
    expected = sorted(renamed.get(name, name) for name, _, _ in LAYOUT["bounding_box_train"])
    assert [os.path.basename(p) for p in train.paths] == expected
    assert len(train.paths) == len(LAYOUT["bounding_box_train"])  # no identity vanished
    by_name = {name: (pid, camid) for name, pid, camid in LAYOUT["bounding_box_train"]}
    for path, pid, camid in zip(train.paths, train.pids, train.camids):
        name = os.path.basename(path)
        original = next(old for old in by_name if old.lower() == name.lower())
        assert (pid, camid) == by_name[original]
    upper = os.path.join(folder, "0007_c1s1_000101_01.JPG")
    assert market1501.decode(upper).shape == (HEIGHT, WIDTH, 3)


@pytest.mark.parametrize("name", ["0002_c1s1_000999_01.png", "0002_c1s1_000999_01.jpeg",
                                  "0002_c1s1_000999_01.JPEG", "photo.bmp"])
def test_an_image_file_not_named_jpg_is_refused_not_skipped(market_copy, name):
    path = os.path.join(market_copy, "bounding_box_test", name)
    shutil.copy(os.path.join(market_copy, "query", LAYOUT["query"][0][0]), path)
    suffix = os.path.splitext(name)[1]
    with pytest.raises(UserError, match=f"^{re.escape(path)} is a {re.escape(suffix)} file, "
                                        f"but Market-1501's images are JPEG files named .jpg"):
        market1501.scan(market_copy)


# --- Market-1501-style crops ---------------------------------------------------------------

SAMPLE_FOLDERS = [FIXTURE_SAMPLES] + ([REAL_SAMPLES] if REAL_SAMPLES else [])


@pytest.mark.parametrize("folder", SAMPLE_FOLDERS, ids=["fixture", "real"][:len(SAMPLE_FOLDERS)])
def test_market_crops_decode_and_parse(folder):
    names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))
    assert names and (folder != FIXTURE_SAMPLES or len(names) == 5)
    paths = [os.path.join(folder, n) for n in names]
    for name, path in zip(names, paths):
        # The naming convention, read independently of the loader's regular expression.
        identity, camera_sequence = name.split("_")[:2]
        assert market1501.parse_filename(path) == (int(identity), int(camera_sequence[1]))
        assert market1501.decode(path).shape == (128, 64, 3)
    market1501.check_images(paths)
    (images,) = list(market1501.eval_dataset(paths, batch_size=8))
    assert images.shape == (len(paths), 224, 224, 3)
    assert -1.0 <= float(tf.reduce_min(images)) < float(tf.reduce_max(images)) <= 1.0


def test_fixture_crops_are_encoded_like_market_1501():
    """Baseline JPEG, JFIF 1.01 with aspect-ratio density 1x1, 8-bit, 3 components at 4:2:0,
    64x128: the header of every real Market-1501 crop, read byte by byte here."""
    names = sorted(n for n in os.listdir(FIXTURE_SAMPLES) if n.endswith(".jpg"))
    pids = sorted(int(n.split("_")[0]) for n in names)
    assert pids[:2] == [-1, 0] and all(p > 0 for p in pids[2:])  # junk, distractor, people
    for name in names:
        with open(os.path.join(FIXTURE_SAMPLES, name), "rb") as f:
            data = f.read()
        assert data[:4] == b"\xff\xd8\xff\xe0" and data[-2:] == b"\xff\xd9"
        assert data[6:11] == b"JFIF\0" and data[11:14] == b"\x01\x01\x00"  # 1.01, no unit
        assert data[14:18] == b"\x00\x01\x00\x01"  # density 1x1
        assert b"\xff\xc2" not in data  # not progressive
        frame = data.index(b"\xff\xc0")
        assert data[frame + 4:frame + 10] == b"\x08\x00\x80\x00\x40\x03"  # 8 bit, 128x64, 3
        assert data[frame + 11] == 0x22 and data[frame + 14] == data[frame + 17] == 0x11  # 4:2:0


def test_a_dangling_link_is_named_not_skipped(market_copy):
    link = os.path.join(market_copy, "gt_bbox", "0005_c2s1_000021_00.jpg")
    os.symlink(os.path.join(market_copy, "nowhere.jpg"), link)
    with pytest.raises(UserError, match=f"^{re.escape(link)} cannot be read"):
        market1501.scan(market_copy)
