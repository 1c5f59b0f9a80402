"""Independent training: each peer learns alone (the paper's baseline)."""

from dml_tf.methods import base


class Independent(base.Method):
    """L_k = CE_k. No interaction between peers; any cohort size, including 1."""

    name = "independent"
    min_peers = 1
    mutual = False  # no term between peers
