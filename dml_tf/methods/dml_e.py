"""DML with one ensemble teacher, DML_e (Zhang et al. 2018, Eq. 11)."""

import tensorflow as tf

from dml_tf import losses
from dml_tf.methods import base


class DMLEnsemble(base.Method):
    """L_k = CE_k + KL(p_avg ‖ p_k), p_avg = 1/(K−1) Σ_{l≠k} p_l (a constant for peer k).

    Paper Eq. 11; Sec. 4.8 finds it worse than `dml` because averaging sharpens the target.
    For K = 2 it equals `dml`.
    """

    name = "dml_e"
    min_peers = 2

    def mimicry(self, logits, k, *, features=None):
        targets = base.peer_probabilities(logits)
        others = [targets[l] for l in range(len(logits)) if l != k]
        return losses.kl_divergence(tf.add_n(others) / float(len(others)), logits[k])
