"""dml_tf: Deep Mutual Learning (Zhang et al., CVPR 2018) in TensorFlow 2 / Keras 3."""

__version__ = "0.1.0"
