"""Deep Mutual Learning with K−1 teachers (Zhang et al. 2018, Eq. 10)."""

import tensorflow as tf

from dml_tf import losses
from dml_tf.methods import base


class DML(base.Method):
    """L_k = CE_k + 1/(K−1) Σ_{l≠k} KL(p_l ‖ p_k).

    Paper Eq. 10 (Eq. 5/6 for K = 2). The peers' p_l are constants for peer k.
    """

    name = "dml"
    min_peers = 2

    def mimicry(self, logits, k, *, features=None):
        targets = base.peer_probabilities(logits)
        terms = [losses.kl_divergence(targets[l], logits[k]) for l in range(len(logits)) if l != k]
        return tf.add_n(terms) / float(len(terms))
