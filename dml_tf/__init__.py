"""dml_tf: Deep Mutual Learning (Zhang et al., CVPR 2018) in TensorFlow 2 / Keras 3."""

__version__ = "0.1.0"

__all__ = ["MutualLearning"]


def __getattr__(name):
    # Lazy (PEP 562): `import dml_tf` and `dml_tf.config` must not start TensorFlow, so that
    # the run scripts check their flags in a second.
    if name == "MutualLearning":
        from dml_tf.mutual_learning import MutualLearning
        return MutualLearning
    raise AttributeError(f"module 'dml_tf' has no attribute {name!r}")
