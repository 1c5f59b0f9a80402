"""SavedModel export: the serving contract, atomic replacement, and the export check."""

import errno
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from dml_tf import cohort as cohort_lib
from dml_tf import disk, export, methods, nets, run_dir
from dml_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
SHAPE, CLASSES, FEATURES = (16, 16, 3), 5, 16  # tiny's "features" layer is 16-d
MEAN, STD = np.array([100.0, 120.0, 140.0]), np.array([50.0, 60.0, 70.0])


def _preprocess(images):
    return (tf.cast(images, tf.float32) - MEAN.astype(np.float32)) / STD.astype(np.float32)


def _cohort(peers=2):
    models = [nets.build("tiny", CLASSES, SHAPE) for _ in range(peers)]
    return cohort_lib.Cohort(models, [keras.optimizers.SGD(0.1) for _ in models],
                             methods.get("dml" if peers > 1 else "independent"))


def _images(n, shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def _run(code, *args, timeout=300):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(cohort, export dir) of a tiny pair exported at 16x16 with a normalisation."""
    keras.utils.set_random_seed(7)
    cohort = _cohort()
    export_dir = str(tmp_path_factory.mktemp("serving") / "export")
    export.export_cohort(cohort, export_dir, _preprocess)
    return cohort, export_dir


# --- The serving contract --------------------------------------------------------------------

def test_served_outputs_match_numpy_references(exported):
    cohort, export_dir = exported
    images = _images(6)
    inputs = ((images - MEAN) / STD).astype(np.float32)
    probs = [_softmax(m(inputs, training=False).numpy().astype(np.float64)) for m in cohort.models]
    feats = [keras.Model(m.input, m.get_layer("features").output)(inputs).numpy()
             for m in cohort.models]
    unit = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in feats]
    for name, p, f in [("peer1", probs[0], feats[0]), ("peer2", probs[1], feats[1]),
                       ("ensemble", (probs[0] + probs[1]) / 2, np.concatenate(unit, 1))]:
        loaded = tf.saved_model.load(os.path.join(export_dir, name))
        for served in (loaded.signatures["serving_default"](images=tf.constant(images)),
                       loaded.serve(tf.constant(images))):
            np.testing.assert_allclose(served["probabilities"].numpy(), p, atol=1e-5)
            np.testing.assert_allclose(_softmax(served["logits"].numpy()), p, atol=1e-5)
            np.testing.assert_allclose(served["features"].numpy(), f, atol=1e-5)


# Unchecked, wrong shapes would reach the convolutions, where oneDNN may abort the process:
# they are served in a child process, whose exit status tells an abort from a clean error.
_WRONG_SHAPES = {"one image without batch axis": (16, 16, 3), "rank 5": (1, 2, 16, 16, 3),
                 "one channel": (2, 16, 16, 1), "28x28": (2, 28, 28, 3),
                 "64x64": (2, 64, 64, 3)}
_SERVE_WRONG_SHAPES = """
import json, sys
import numpy as np, tensorflow as tf
path, shapes = sys.argv[1], json.loads(sys.argv[2])
loaded = tf.saved_model.load(path)
for name, shape in shapes.items():
    x = tf.constant(np.zeros(shape, np.uint8))
    for how, call in [("signature", lambda: loaded.signatures["serving_default"](images=x)),
                      ("serve", lambda: loaded.serve(x))]:
        try:
            call()
            print(json.dumps([name, how, "served"]), flush=True)
        except Exception as e:
            print(json.dumps([name, how, type(e).__name__ + ": " + str(e)]), flush=True)
"""


@pytest.fixture(scope="module")
def wrong_shape_results(exported):
    """{(case, "signature" | "serve"): outcome} from serving _WRONG_SHAPES in a child process."""
    _, export_dir = exported
    proc = _run(_SERVE_WRONG_SHAPES, os.path.join(export_dir, "ensemble"),
                json.dumps(_WRONG_SHAPES))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    return {(name, how): outcome for name, how, outcome in lines}


@pytest.mark.parametrize("how", ["signature", "serve"])
@pytest.mark.parametrize("case", list(_WRONG_SHAPES))
def test_wrong_shapes_fail_with_the_expected_shape(wrong_shape_results, case, how):
    outcome = wrong_shape_results[(case, how)]
    assert outcome.startswith("InvalidArgumentError"), outcome
    assert "serving_default takes uint8 images of shape [N, 16, 16, 3]" in outcome
    got = " ".join(str(s) for s in _WRONG_SHAPES[case])
    assert f"got images of shape] [{got}]" in outcome


def test_float_images_are_refused_by_the_signature(exported):
    _, export_dir = exported
    loaded = tf.saved_model.load(os.path.join(export_dir, "peer1"))
    floats = tf.zeros([2, *SHAPE], tf.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a uint8 tensor"):
        loaded.signatures["serving_default"](images=floats)
    with pytest.raises(TypeError, match="dtype=tf.uint8"):
        loaded.serve(floats)


def test_an_empty_batch_returns_empty_outputs(exported):
    _, export_dir = exported
    empty = tf.zeros([0, *SHAPE], tf.uint8)
    for name, width in [("peer1", FEATURES), ("ensemble", 2 * FEATURES)]:
        loaded = tf.saved_model.load(os.path.join(export_dir, name))
        for served in (loaded.signatures["serving_default"](images=empty), loaded.serve(empty)):
            assert served["probabilities"].shape == (0, CLASSES)
            assert served["logits"].shape == (0, CLASSES)
            assert served["features"].shape == (0, width)


def test_a_resizing_export_serves_any_size_but_only_rank_4_rgb(tmp_path):
    cohort = _cohort()
    resize = lambda images: tf.image.resize(images, SHAPE[:2]) / 255.0  # noqa: E731
    export.export_cohort(cohort, str(tmp_path / "export"), resize, serving_shape=(None, None, 3))
    loaded = tf.saved_model.load(str(tmp_path / "export" / "peer2"))
    serve = loaded.signatures["serving_default"]
    for shape in [(3, 20, 24, 3), (1, 9, 40, 3)]:
        images = _images(shape[0], shape[1:])
        inputs = tf.image.resize(images.astype(np.float32), SHAPE[:2]).numpy() / 255.0
        expected = _softmax(cohort.models[1](inputs, training=False).numpy())
        np.testing.assert_allclose(serve(images=tf.constant(images))["probabilities"].numpy(),
                                   expected, atol=1e-5)
    assert serve(images=tf.zeros([0, 7, 7, 3], tf.uint8))["features"].shape == (0, FEATURES)
    for shape in [(20, 24, 3), (2, 20, 24, 1), (2, 0, 24, 3)]:
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"uint8 images of shape \[N, any, any, 3\]"):
            serve(images=tf.zeros(shape, tf.uint8))


def test_ensemble_logits_stay_finite_when_probabilities_underflow(tmp_path):
    cohort = _cohort()
    for m in cohort.models:  # confident peers: exp(-logit gaps) underflows float32 to 0
        kernel = m.get_layer("logits").kernel
        kernel.assign(kernel * 3000.0)
    export.export_cohort(cohort, str(tmp_path / "export"), _preprocess)
    images = _images(8, seed=3)
    inputs = ((images - MEAN) / STD).astype(np.float32)
    logits = [m(inputs, training=False).numpy().astype(np.float64) for m in cohort.models]
    log_probs = [z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(
        1, keepdims=True)) for z in logits]
    mean_probs = np.mean([np.exp(lp) for lp in log_probs], axis=0)
    assert (mean_probs.astype(np.float32) == 0).any(), "the test needs probabilities that underflow"
    stacked = np.stack(log_probs)
    top = stacked.max(axis=0)
    expected = top + np.log(np.exp(stacked - top).sum(axis=0)) - np.log(2)
    served = tf.saved_model.load(str(tmp_path / "export" / "ensemble")).signatures[
        "serving_default"](images=tf.constant(images))
    assert np.isfinite(served["logits"].numpy()).all()
    np.testing.assert_allclose(served["logits"].numpy(), expected, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(_softmax(served["logits"].numpy().astype(np.float64)), mean_probs,
                               atol=1e-6)
    np.testing.assert_allclose(served["probabilities"].numpy(), mean_probs, atol=1e-6)


# --- Atomic exports ------------------------------------------------------------------------

def _siblings(export_dir):
    parent, base = os.path.split(export_dir)
    return sorted(n for n in os.listdir(parent) if n.startswith(base + "."))


def _served_probabilities(export_dir, images):
    serve = tf.saved_model.load(os.path.join(export_dir, "ensemble")).signatures["serving_default"]
    return serve(images=tf.constant(images))["probabilities"].numpy()


def test_marker_lists_the_savedmodels_and_source(tmp_path):
    export_dir = str(tmp_path / "export")
    paths = export.export_cohort(_cohort(), export_dir, source="ckpt-3")
    assert paths == {n: os.path.join(export_dir, n) for n in ("peer1", "peer2", "ensemble")}
    with open(os.path.join(export_dir, "COMPLETE.json")) as f:
        marker = json.load(f)
    assert marker["savedmodels"] == ["peer1", "peer2", "ensemble"]
    assert marker["source"] == "ckpt-3" and marker["time"]
    assert export.is_complete(export_dir) and export.is_complete(export_dir, "ckpt-3")
    assert not export.is_complete(export_dir, "ckpt-4")
    assert _siblings(export_dir) == []


def test_incomplete_exports_are_reported_and_replaced(exported, tmp_path):
    _, source_dir = exported
    half = tmp_path / "half"  # SavedModels written, no marker: what a killed old export left
    for name in ("peer1", "peer2"):
        shutil.copytree(os.path.join(source_dir, name), half / name)
    assert not export.is_complete(str(half))
    (half / "COMPLETE.json").write_text(json.dumps({"savedmodels": ["peer1", "peer2",
                                                                    "ensemble"]}))
    assert not export.is_complete(str(half))  # the marker lists a SavedModel that is not there
    (half / "COMPLETE.json").write_text('{"savedmodels": ["peer1"')
    assert not export.is_complete(str(half))
    assert not export.is_complete(str(tmp_path / "missing"))
    stale = tmp_path / "half.tmp-999999" / "peer1"  # a killed export's staging folder
    stale.mkdir(parents=True)
    export.export_cohort(_cohort(), str(half), source="new")
    assert export.is_complete(str(half), "new")
    assert sorted(os.listdir(half)) == ["COMPLETE.json", "ensemble", "peer1", "peer2"]
    assert _siblings(str(half)) == []


def test_a_failure_while_writing_keeps_the_previous_export(tmp_path, monkeypatch):
    export_dir = str(tmp_path / "export")
    images = _images(4)
    export.export_cohort(_cohort(), export_dir, source="old")
    before = _served_probabilities(export_dir, images)
    real_save, calls = tf.saved_model.save, []

    def save_once_then_fail(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(*args, **kwargs)

    monkeypatch.setattr(tf.saved_model, "save", save_once_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export.export_cohort(_cohort(), export_dir, source="new")
    assert len(calls) == 2 and os.path.dirname(calls[0]) != export_dir  # written to staging
    assert export.is_complete(export_dir, "old")
    np.testing.assert_array_equal(_served_probabilities(export_dir, images), before)
    assert _siblings(export_dir) == []


def _du(path):
    """Bytes a folder takes on disk, as `du` counts them (whole blocks)."""
    out = subprocess.run(["du", "-s", "-B1", path], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_a_full_disk_keeps_the_previous_export_and_says_how_much_space(tmp_path, monkeypatch):
    export_dir = str(tmp_path / "export")
    images = _images(4)
    export.export_cohort(_cohort(), export_dir, source="old")
    before, size = _served_probabilities(export_dir, images), _du(export_dir)
    real_write = run_dir.write_json_atomically

    def full(path, value):  # the marker, last of all: every SavedModel was written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(run_dir, "write_json_atomically", full)
    with pytest.raises(UserError) as raised:
        export.export_cohort(_cohort(), export_dir, source="new")
    monkeypatch.setattr(run_dir, "write_json_atomically", real_write)
    free = disk.human(shutil.disk_usage(str(tmp_path)).free)
    assert str(raised.value) == (
        f"The disk holding {tmp_path} is full (the export needs about {size / 1000:.1f} kB, "
        f"{free} free); free that much space there and export again (the previous export in "
        f"{export_dir} is kept).")
    assert 1e3 < size < 1e6  # kilobytes, to one decimal
    assert export.is_complete(export_dir, "old") and _siblings(export_dir) == []
    np.testing.assert_array_equal(_served_probabilities(export_dir, images), before)


def test_a_full_disk_at_the_first_export_estimates_from_the_weights(tmp_path, monkeypatch):
    export_dir = str(tmp_path / "export")
    cohort = _cohort()
    # TensorFlow's writers report ENOSPC as ResourceExhaustedError with the system's text.
    full = tf.errors.ResourceExhaustedError(
        None, None, f"{export_dir}.tmp-1/peer1/variables/variables_temp/part-00000-of-00001"
                    ".data-00000-of-00001.tempstate1; No space left on device [Op:SaveV2]")
    monkeypatch.setattr(tf.saved_model, "save", lambda *a, **k: (_ for _ in ()).throw(full))
    with pytest.raises(UserError) as raised:
        export.export_cohort(cohort, export_dir)
    # Each peer's float32 weights twice: in its own SavedModel and in the ensemble's.
    weights = 2 * 4 * sum(m.count_params() for m in cohort.models)
    assert f"(the export needs about {weights / 1000:.1f} kB, " in str(raised.value)
    assert str(raised.value).endswith(f"(nothing was written to {export_dir}).")
    assert not os.path.exists(export_dir) and _siblings(export_dir) == []
    # Other failures of the writers are not a full disk: they pass unchanged.
    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    monkeypatch.setattr(tf.saved_model, "save", lambda *a, **k: (_ for _ in ()).throw(oom))
    with pytest.raises(tf.errors.ResourceExhaustedError, match="OOM"):
        export.export_cohort(cohort, export_dir)


def _failing_save(*args, **kwargs):
    raise OSError("disk full")


_KILLED_EXPORT = """
import os, sys
import keras
from dml_tf import cohort as cohort_lib, export, methods, nets
export_dir, point = sys.argv[1], sys.argv[2]
models = [nets.build("tiny", 5, (16, 16, 3))]  # one peer: two SavedModels, a faster child
cohort = cohort_lib.Cohort(models, [keras.optimizers.SGD(0.1)], methods.get("independent"))
if point == "after_exchange":
    real_exchange = export._exchange
    def exchange_then_die(a, b):
        if real_exchange(a, b):
            os._exit(9)
        sys.exit("this system cannot exchange paths atomically")
    export._exchange = exchange_then_die
else:  # between the two renames of the fallback: old export moved aside, new one not yet in
    export._exchange = lambda a, b: False
    real_rename = os.rename
    def rename_unless_new(a, b):
        if ".tmp-" in os.path.basename(a):
            os._exit(9)
        real_rename(a, b)
    os.rename = rename_unless_new
export.export_cohort(cohort, export_dir, source="new")
sys.exit("the export was not interrupted")
"""


@pytest.mark.parametrize("point", ["after_exchange", "between_renames"])
def test_a_killed_export_leaves_one_complete_export(tmp_path, monkeypatch, point):
    export_dir = str(tmp_path / "export")
    export.export_cohort(_cohort(peers=1), export_dir, source="old")
    proc = _run(_KILLED_EXPORT, export_dir, point)
    assert proc.returncode == 9, proc.stderr[-2000:]
    leftovers = [os.path.join(str(tmp_path), n) for n in _siblings(export_dir)]
    if point == "after_exchange":  # the new export is in place; the old one waits for removal
        assert export.is_complete(export_dir, "new")
        assert [export.is_complete(p, "old") for p in leftovers] == [True]
    else:  # no export in place (a rerun exports again); both whole exports beside it
        assert not export.is_complete(export_dir)
        assert sorted(export.is_complete(p, "old") for p in leftovers) == [False, True]
        assert sorted(export.is_complete(p, "new") for p in leftovers) == [False, True]
        # The next export puts the set-aside one back first, so even its failure keeps it.
        with monkeypatch.context() as patch:
            patch.setattr(tf.saved_model, "save", _failing_save)
            with pytest.raises(OSError, match="disk full"):
                export.export_cohort(_cohort(peers=1), export_dir, source="failed")
        assert export.is_complete(export_dir, "old")
    export.export_cohort(_cohort(peers=1), export_dir, source="rerun")
    assert export.is_complete(export_dir, "rerun")
    assert _siblings(export_dir) == []


# --- The export check --------------------------------------------------------------------------

def test_check_export_fails_on_disagreement(tmp_path):
    cohort = _cohort()
    paths = export.export_cohort(cohort, str(tmp_path / "export"), _preprocess)
    images = tf.constant(_images(4))
    export.check_export(paths, cohort, images, _preprocess)  # the export as written passes
    kernel = cohort.models[1].get_layer("logits").kernel
    kernel.assign(-kernel)  # other class scores, same network
    with pytest.raises(RuntimeError) as error:
        export.check_export(paths, cohort, images, _preprocess)
    message = str(error.value)
    assert message.startswith(f"The SavedModel at {paths['peer2']} disagrees with the trained")
    assert message.count(". ") == 0 and message.endswith(").")


def test_a_non_finite_cohort_fails_the_export_and_keeps_the_previous_one(tmp_path):
    export_dir = str(tmp_path / "export")
    images = tf.constant(_images(4))
    good = _cohort()
    export.export_cohort(good, export_dir, _preprocess, check_images=images, source="good")
    broken = _cohort()  # what --on_nan=skip with a huge learning rate leaves
    kernel = broken.models[0].get_layer("logits").kernel
    kernel.assign(tf.fill(kernel.shape, np.nan))
    with pytest.raises(RuntimeError) as error:
        export.export_cohort(broken, export_dir, _preprocess, check_images=images, source="nan")
    message = str(error.value)
    assert message.startswith(f"The SavedModel at {os.path.join(export_dir, 'peer1')} serves "
                              "non-finite probabilities")
    assert message.count(". ") == 0 and message.endswith(".")
    assert export.is_complete(export_dir, "good")
    assert _siblings(export_dir) == []
    # Without the export's own check, check_export rejects the NaN SavedModel too.
    paths = export.export_cohort(broken, str(tmp_path / "unchecked"), _preprocess)
    with pytest.raises(RuntimeError, match="non-finite"):
        export.check_export(paths, broken, images, _preprocess)


class UsersSubclassed(keras.Model):
    """A user's subclassed peer: no graph of layers, no "features" layer."""

    def __init__(self):
        super().__init__()
        self.flat = keras.layers.Flatten()
        self.dense = keras.layers.Dense(CLASSES)

    def call(self, x):
        return self.dense(self.flat(x))


def test_users_own_sequential_and_subclassed_peers_export_probabilities_and_logits(tmp_path):
    """Peers without a "features" layer (a Sequential, a subclassed model) still export; the
    SavedModels then serve probabilities and logits only."""
    sequential = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                                   keras.layers.Dense(CLASSES)])
    subclassed = UsersSubclassed()
    subclassed.build((None, *SHAPE))
    cohort = cohort_lib.Cohort([sequential, subclassed], [keras.optimizers.SGD(0.1)] * 2,
                               methods.get("dml"))
    images = _images(3)
    paths = export.export_cohort(cohort, str(tmp_path / "export"), check_images=images)
    served = tf.saved_model.load(paths["ensemble"]).signatures["serving_default"](images=images)
    assert set(served) == {"probabilities", "logits"}
    x = images.astype(np.float32)
    expected = (_softmax(sequential(x).numpy()) + _softmax(subclassed(x).numpy())) / 2
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
    empty = tf.saved_model.load(paths["peer2"]).signatures["serving_default"](
        images=np.zeros((0, *SHAPE), np.uint8))
    assert empty["logits"].shape == (0, CLASSES)
