"""Deep Mutual Learning with the symmetric Jensen-Shannon-style mimicry (paper Eq. 7)."""

import tensorflow as tf

from dml_tf import losses
from dml_tf.methods import base


class DMLJensenShannon(base.Method):
    """L_k = CE_k + 1/(K−1) Σ_{l≠k} ½ (KL(p_l ‖ p_k) + KL(p_k ‖ p_l)).

    Paper Eq. 7, averaged over the K−1 peers as in Eq. 10. In both terms only p_k carries
    gradient: p_l is a constant, whichever side of the divergence it stands on.
    """

    name = "dml_js"
    min_peers = 2

    def mimicry(self, logits, k, *, features=None):
        targets = base.peer_probabilities(logits)
        probs_k = tf.nn.softmax(tf.cast(logits[k], tf.float32))
        terms = []
        for l in range(len(logits)):
            if l == k:
                continue
            forward = losses.kl_divergence(targets[l], logits[k])
            reverse = losses.kl_divergence(probs_k, tf.stop_gradient(logits[l]))
            terms.append(0.5 * (forward + reverse))
        return tf.add_n(terms) / float(len(terms))
