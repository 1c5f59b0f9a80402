"""SavedModel export: one model per peer and one for the ensemble, served on uint8 images."""

import os

import keras
import numpy as np
import tensorflow as tf


class _Serving(tf.Module):
    """uint8 NHWC images -> {"probabilities", "logits", "features"} of one peer or the ensemble."""

    def __init__(self, models, preprocess, image_shape):
        super().__init__()
        self.models = list(models)
        # Same layers and weights, with the "features" pooling layer as a second output.
        self.embedders = [keras.Model(m.input, [m.get_layer("features").output, m.output])
                          for m in self.models]
        self._preprocess = preprocess
        spec = tf.TensorSpec([None, *image_shape], tf.uint8, name="images")
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, images):
        inputs = self._preprocess(images)
        outputs = [e(inputs, training=False) for e in self.embedders]
        features = [tf.cast(f, tf.float32) for f, _ in outputs]
        logits = [tf.cast(z, tf.float32) for _, z in outputs]
        probs = [tf.nn.softmax(z) for z in logits]
        if len(self.models) == 1:
            return {"probabilities": probs[0], "logits": logits[0], "features": features[0]}
        mean_probs = tf.add_n(probs) / float(len(probs))
        # The ensemble's embedding concatenates the L2-normalised peer features (paper Fig. 3b).
        joint = tf.concat([tf.math.l2_normalize(f, axis=-1) for f in features], axis=-1)
        # Log of the averaged probabilities: logits whose softmax is the ensemble's output.
        return {"probabilities": mean_probs, "logits": tf.math.log(mean_probs), "features": joint}


def _default_preprocess(images):
    return tf.cast(images, tf.float32)


def export_cohort(cohort, export_dir, preprocess=None, serving_shape=None):
    """Writes `export_dir/peer{k}` for k = 1..K and `export_dir/ensemble`.

    Each SavedModel's `serving_default` signature takes uint8 images [N, H, W, 3] as the
    dataset stores them and returns `probabilities` and `logits` (float32 [N, M]) and
    `features` (the "features" pooling layer; for the ensemble, the concatenation of the
    L2-normalised peer features: the re-identification embedding).

    Args:
      cohort: a dml_tf.cohort.Cohort.
      export_dir: output folder.
      preprocess: uint8 images -> the float inputs the networks were trained on (the data
        pipeline's normalisation, resizing); default: a cast to float32.
      serving_shape: (H, W, C) of the served images, None entries for any size (where
        `preprocess` resizes); default: the networks' input shape.

    Returns:
      dict name -> SavedModel path.
    """
    preprocess = preprocess or _default_preprocess
    image_shape = tuple(serving_shape or cohort.models[0].input_shape[1:])
    groups = {f"peer{k}": [m] for k, m in enumerate(cohort.models, start=1)}
    groups["ensemble"] = cohort.models
    paths = {}
    for name, models in groups.items():
        module = _Serving(models, preprocess, image_shape)
        path = os.path.join(export_dir, name)
        tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
        paths[name] = path
    return paths


def check_export(paths, cohort, images, preprocess=None, atol=1e-4):
    """Reloads every exported SavedModel and compares it with the in-memory cohort.

    Raises:
      RuntimeError: a SavedModel's probabilities differ from the cohort's on `images`.
    """
    preprocess = preprocess or _default_preprocess
    expected = [np.asarray(p) for p in cohort.predict(preprocess(images))]
    expected = {f"peer{k}": p for k, p in enumerate(expected, start=1)} | {
        "ensemble": np.mean(expected, axis=0)}
    for name, path in paths.items():
        served = tf.saved_model.load(path).signatures["serving_default"](images=images)
        gap = float(np.max(np.abs(served["probabilities"].numpy() - expected[name])))
        if gap > atol:
            raise RuntimeError(f"The SavedModel at {path} disagrees with the trained cohort "
                               f"(max probability difference {gap:.2e}).")
