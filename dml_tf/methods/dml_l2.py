"""DML plus a feature-distance term between the peers (paper Sec. 4.9, Table 5 "DML, L2")."""

import tensorflow as tf

from dml_tf.methods import base
from dml_tf.methods import dml


def squared_distance(features_k, features_l):
    """‖f_k − f_l‖²: summed over the feature dimensions, mean over the batch (scalar float32)."""
    diff = tf.cast(features_k, tf.float32) - tf.cast(features_l, tf.float32)
    return tf.reduce_mean(tf.reduce_sum(tf.square(diff), axis=-1))


class DMLFeatureL2(dml.DML):
    """L_k = CE_k + 1/(K−1) Σ_{l≠k} KL(p_l ‖ p_k) + γ·1/(K−1) Σ_{l≠k} ‖f_k − f_l‖².

    DML (Eq. 10) plus the feature-distance loss of distillation studies (the paper's refs
    [1, 19]), between the peers' last-pooling features f (the "features" layer); the other
    peers' p_l and f_l are constants for peer k. The paper (Sec. 4.9, Table 5) adds it to show
    that pulling the peers' representations together removes the diversity they teach each
    other with: DML, L2 scores below DML on Market-1501.

    Default γ = 0.01. The paper gives no value. At initialisation (training-mode BatchNorm,
    32×32 inputs) ‖f_1 − f_2‖² between two peers is about 8 for ResNet-32 (64-d features)
    and 55 for MobileNet (1024-d), so γ = 0.01 starts the term at 0.1–0.5: felt, yet below
    the initial cross-entropy (log M = 4.6 on CIFAR-100, 6.6 on Market-1501) so that it does
    not simply collapse the features. Set it with `--method_args=gamma=...`.

    Reported terms: "ce", "mimicry" (the KL average), "feature_l2" (the unweighted distance
    average) and "total" = ce + mimicry + γ·feature_l2.

    Attributes:
      uses_features: the cohort passes `features=`, one [B, D] tensor per peer.
    """

    name = "dml_l2"
    min_peers = 2
    uses_features = True

    def __init__(self, gamma=0.01, label_smoothing=0.0):
        """Args:
          gamma: γ ≥ 0, weight of the feature distance (0 gives `dml`).
          label_smoothing: ε of the cross-entropy targets.
        """
        super().__init__(label_smoothing=label_smoothing)
        self.gamma = base.hyperparameter(gamma, "gamma", "a number >= 0", lambda v: v >= 0)

    def losses(self, logits, labels, *, label_mask=None, features=None):
        """Per-peer {"ce", "mimicry", "feature_l2", "total"}; args as `base.Method.losses`.

        Raises:
          ValueError: `features` is not one tensor per peer (the cohort provides them because
            of `uses_features`; a direct caller must too).
        """
        if features is None or len(features) != len(logits):
            raise ValueError("dml_l2 needs features=[one [B, D] tensor per peer] (the "
                             "cohort passes them for methods with uses_features = True).")
        out = super().losses(logits, labels, label_mask=label_mask)
        # Like p_l in the KL, the other peers' features are targets: peer k moves only f_k.
        targets = [tf.stop_gradient(f) for f in features]
        for k, terms in enumerate(out):
            distances = [squared_distance(features[k], targets[l])
                         for l in range(len(features)) if l != k]
            feature_l2 = tf.add_n(distances) / float(len(distances))
            terms["feature_l2"] = feature_l2
            terms["total"] = terms["total"] + self.gamma * feature_l2
        return out
