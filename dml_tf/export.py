"""SavedModel export: one model per peer and one for the ensemble, served on uint8 images.

An export folder is replaced as a whole: the SavedModels are written and checked in a
temporary sibling folder, a `COMPLETE.json` marker is written last, and the folder is
swapped into place, so that a reader (or a killed export) never sees peers of two exports.
"""

import ctypes
import datetime
import errno
import glob
import json
import math
import os
import shutil
import sys
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from dml_tf import cohort as cohort_lib
from dml_tf import disk, run_dir
from dml_tf.errors import UserError

MARKER = "COMPLETE.json"


class _Serving(tf.Module):
    """uint8 NHWC images -> {"probabilities", "logits", "features"} of one peer or the ensemble."""

    def __init__(self, models, preprocess, image_shape):
        super().__init__()
        self.models = list(models)
        self.embedders = [_embedder(m) for m in self.models]
        # A model without a "features" layer (a user's own) serves probabilities and logits only.
        self.with_features = all(e is not None for e in self.embedders)
        self._num_classes = _num_outputs(self.models[0])
        self._preprocess = preprocess
        self._image_shape = tuple(image_shape)
        # Unknown rank on purpose: a loaded signature does not check shapes, so images of the
        # wrong rank must reach `_checked` (a clear error) rather than the convolutions (which
        # may abort the process). A wrong dtype is refused by the signature itself.
        spec = tf.TensorSpec(None, tf.uint8, name="images")
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, images):
        images = self._checked(images)
        return tf.cond(tf.shape(images)[0] > 0, lambda: self._outputs(images), self._empty)

    def _checked(self, images):
        """`images` once they are known to be [N, H, W, C] of the served shape."""
        sides = [-1 if s is None else s for s in self._image_shape]
        expected = "[N, " + ", ".join("any" if s < 0 else str(s) for s in sides) + "]"
        shape = tf.shape(images)

        def sides_match():
            known = tf.constant(sides) >= 0
            return tf.reduce_all(tf.where(known, tf.equal(shape[1:], sides), shape[1:] > 0))

        ok = tf.cond(tf.equal(tf.size(shape), 4), sides_match, lambda: tf.constant(False))
        check = tf.debugging.Assert(ok, [f"serving_default takes uint8 images of shape {expected}; "
                                         "got images of shape", shape], summarize=8)
        # The data dependency (not only the control edge) keeps every later op after the check.
        with tf.control_dependencies([check]):
            images = tf.identity(images)
        return tf.ensure_shape(images, [None, *self._image_shape])

    def _outputs(self, images):
        inputs = self._preprocess(images)
        if self.with_features:
            outputs = [e(inputs, training=False) for e in self.embedders]
        else:
            outputs = [(None, m(inputs, training=False)) for m in self.models]
        logits = [tf.cast(z, tf.float32) for _, z in outputs]
        features = [tf.cast(f, tf.float32) for f, _ in outputs] if self.with_features else None
        if len(self.models) == 1:
            single = {"probabilities": tf.nn.softmax(logits[0]), "logits": logits[0]}
            return single | ({"features": features[0]} if features else {})
        mean_probs = tf.add_n([tf.nn.softmax(z) for z in logits]) / float(len(logits))
        # log(mean_k p_k) as a log-sum-exp of log-probabilities: finite where the probabilities
        # underflow, and its softmax is still the mean of the peers' probabilities.
        log_mean = tf.reduce_logsumexp(tf.stack([tf.nn.log_softmax(z) for z in logits]), axis=0)
        log_mean -= math.log(len(logits))
        ensemble = {"probabilities": mean_probs, "logits": log_mean}
        if not features:
            return ensemble
        # The ensemble's embedding concatenates the L2-normalised peer features (paper Fig. 3b).
        joint = tf.concat([tf.math.l2_normalize(f, axis=-1) for f in features], axis=-1)
        return ensemble | {"features": joint}

    def _empty(self):
        """The outputs of an empty batch, without running networks that may fail on it."""
        num_classes = self._num_classes
        empty = {"probabilities": tf.zeros([0, num_classes]), "logits": tf.zeros([0, num_classes])}
        if not self.with_features:
            return empty
        width = sum(e.outputs[0].shape[-1] for e in self.embedders)
        return empty | {"features": tf.zeros([0, width])}


def _embedder(model):
    """The model with its "features" layer (dml_tf.nets' last pooling) as a first output,
    sharing its weights; None where it has no such layer or is not a graph of layers."""
    try:
        features = model.get_layer("features").output
        return keras.Model(model.inputs, [features, model.outputs[0]])
    except (ValueError, AttributeError, TypeError):
        return None


def _num_outputs(model):
    """The model's number of classes, from its graph or (a subclassed model) one dummy call."""
    try:
        return int(model.outputs[0].shape[-1])
    except (AttributeError, IndexError, TypeError, ValueError):
        shape = cohort_lib.input_shape(model)[1:]
        return int(model(tf.zeros([1, *shape]), training=False).shape[-1])


def _default_preprocess(images):
    return tf.cast(images, tf.float32)


def export_cohort(cohort: "cohort_lib.Cohort", export_dir: str | os.PathLike,
                  preprocess: Callable | None = None, serving_shape: tuple | None = None, *,
                  check_images: Any = None, source: str | None = None) -> dict[str, str]:
    """Writes `export_dir/peer{k}` for k = 1..K and `export_dir/ensemble`, replacing the folder.

    Each SavedModel's `serving_default` signature takes uint8 images [N, H, W, C] as the
    dataset stores them and returns `probabilities` and `logits` (float32 [N, M]) and
    `features` (the "features" pooling layer; for the ensemble, the concatenation of the
    L2-normalised peer features: the re-identification embedding). Any other rank, size or
    dtype fails with an InvalidArgumentError saying what is expected; an empty batch returns
    empty outputs. The ensemble's logits are log(mean of the peers' probabilities).

    The export is atomic: everything is written (and checked) in `export_dir.tmp-<pid>`, then
    `COMPLETE.json` (see `is_complete`), then the folder is swapped into place. A kill at any
    point leaves the previous complete export or the new one, plus leftovers that the next
    export removes; an exception leaves the previous export and no temporary folder.

    Args:
      cohort: a dml_tf.cohort.Cohort.
      export_dir: output folder.
      preprocess: uint8 images -> the float inputs the networks were trained on (the data
        pipeline's normalisation, resizing); default: a cast to float32.
      serving_shape: (H, W, C) of the served images, None entries for any size (where
        `preprocess` resizes); default: the networks' input shape.
      check_images: uint8 images to compare the SavedModels with the cohort on (see
        `check_export`) before they replace the previous export; None: no check.
      source: a string saying what the export was made from (e.g. the checkpoint path), kept
        in the marker for `is_complete`.

    Returns:
      dict name -> SavedModel path.

    Raises:
      RuntimeError: `check_images` were given and a SavedModel fails `check_export`.
      UserError: the disk holding `export_dir` is full (the previous export stays).
    """
    preprocess = preprocess or _default_preprocess
    image_shape = tuple(serving_shape or cohort_lib.input_shape(cohort.models[0])[1:])
    export_dir = os.path.abspath(export_dir)
    _remove_leftovers(export_dir)
    groups = {f"peer{k}": [m] for k, m in enumerate(cohort.models, start=1)}
    groups["ensemble"] = cohort.models
    staging = f"{export_dir}.tmp-{os.getpid()}"
    paths = {name: os.path.join(export_dir, name) for name in groups}
    try:
        _stage(groups, staging, paths, cohort, preprocess, image_shape, check_images, source)
        _swap_into_place(staging, export_dir)
    except Exception as e:  # noqa: BLE001 (TensorFlow's writers raise OpError, Python's OSError)
        if not disk.is_full(e):
            raise
        shutil.rmtree(staging, ignore_errors=True)  # first: the free space it reports is real
        raise UserError(_full_disk_message(export_dir, cohort.models)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def _stage(groups, staging, paths, cohort, preprocess, image_shape, check_images, source):
    """Writes (and checks) every SavedModel of `groups` in `staging`, then the marker."""
    staged = {name: os.path.join(staging, name) for name in groups}
    for name, models in groups.items():
        module = _Serving(models, preprocess, image_shape)
        tf.saved_model.save(module, staged[name], signatures={"serving_default": module.serve})
    if check_images is not None:
        _check_against_cohort(staged, paths, cohort, check_images, preprocess, atol=1e-4)
    now = datetime.datetime.now(datetime.timezone.utc)
    marker = {"savedmodels": list(groups), "source": source,
              "time": now.isoformat(timespec="seconds")}
    run_dir.write_json_atomically(os.path.join(staging, MARKER), marker)


def _full_disk_message(export_dir, models):
    """The sentence for an export that found the disk full: space needed, what is kept."""
    if os.path.isdir(export_dir):
        needed = disk.size_of([export_dir])  # the previous export: the same networks
        kept = f"the previous export in {export_dir} is kept"
    else:
        # Each peer's weights are saved twice: in its own SavedModel and in the ensemble's.
        needed = 2 * sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                         for m in models for v in m.weights)
        kept = f"nothing was written to {export_dir}"
    parent = os.path.dirname(export_dir)
    return f"{disk.full_message('the export', parent, needed)}; free that much space there " \
           f"and export again ({kept})."


def is_complete(export_dir, source=None):
    """Whether `export_dir` holds a whole export (of `source`, when given).

    True when its `COMPLETE.json` marker is readable, every SavedModel it lists is present
    and, if `source` is given, the marker's source equals it.
    """
    try:
        with open(os.path.join(export_dir, MARKER)) as f:
            marker = json.load(f)
        names = marker["savedmodels"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if source is not None and marker.get("source") != source:
        return False
    return bool(names) and all(
        tf.saved_model.contains_saved_model(os.path.join(export_dir, n)) for n in names)


def _remove_leftovers(export_dir):
    """Deletes what a killed export left beside `export_dir`.

    An export set aside by a swap killed between its two renames goes back into place first.
    """
    pattern = glob.escape(export_dir)
    for aside in glob.glob(pattern + ".old-*"):
        if not os.path.exists(export_dir) and is_complete(aside):
            os.rename(aside, export_dir)
        else:
            shutil.rmtree(aside, ignore_errors=True)
    for staging in glob.glob(pattern + ".tmp-*"):
        shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(staging, export_dir):
    """Moves the complete `staging` folder to `export_dir`, whose old content is deleted.

    Where the system can exchange two paths atomically (Linux), `export_dir` holds a
    complete export at every instant. Elsewhere the old export is moved aside first: a kill
    between the two renames leaves no `export_dir` (is_complete is False) until the next
    export puts the old one back and replaces it, never a mix of the two.
    """
    if not os.path.exists(export_dir):
        os.rename(staging, export_dir)
    elif _exchange(staging, export_dir):
        shutil.rmtree(staging)  # now the previous export
    else:
        aside = f"{export_dir}.old-{os.getpid()}"
        os.rename(export_dir, aside)
        os.rename(staging, export_dir)
        shutil.rmtree(aside)


def _exchange(path_a, path_b):
    """Atomically swaps two existing paths (renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(path_a), at_fdcwd, os.fsencode(path_b),
                 rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or file system lacks it
        return False
    raise OSError(err, os.strerror(err), path_b)


def check_export(paths, cohort, images, preprocess=None, atol=1e-4):
    """Reloads every exported SavedModel and compares it with the in-memory cohort.

    Raises:
      RuntimeError: a SavedModel's probabilities or logits are not finite, or its
        probabilities differ from the cohort's on `images` by more than `atol`.
    """
    _check_against_cohort(paths, paths, cohort, images, preprocess, atol)


def _check_against_cohort(paths, shown_paths, cohort, images, preprocess, atol):
    """check_export of `paths`, naming `shown_paths` (where they will live) in its errors."""
    preprocess = preprocess or _default_preprocess
    expected = [np.asarray(p) for p in cohort.predict(preprocess(images))]
    expected = {f"peer{k}": p for k, p in enumerate(expected, start=1)} | {
        "ensemble": np.mean(expected, axis=0)}
    for name, path in paths.items():
        served = tf.saved_model.load(path).signatures["serving_default"](images=images)
        probs, logits = served["probabilities"].numpy(), served["logits"].numpy()
        if not (np.isfinite(probs).all() and np.isfinite(logits).all()):
            raise RuntimeError(f"The SavedModel at {shown_paths[name]} serves non-finite "
                               "probabilities or logits: the trained weights are not usable.")
        same_shape = probs.shape == expected[name].shape
        if not (same_shape and np.allclose(probs, expected[name], rtol=0.0, atol=atol)):
            gap = np.max(np.abs(probs - expected[name])) if same_shape else float("nan")
            raise RuntimeError(f"The SavedModel at {shown_paths[name]} disagrees with the trained "
                               f"cohort (max probability difference {gap:.2e}).")
