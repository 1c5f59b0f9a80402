"""Independent training with a confidence penalty (Pereyra et al. 2017).

The "Independent, Entropy" row of the paper's Table 5 (Sec. 4.8): a blind preference for
high-entropy posteriors, against which DML's matching of "reasonable" secondary classes is
compared.
"""

from dml_tf import losses
from dml_tf.methods import base


class EntropyRegularised(base.Method):
    """L_k = CE_k − β·H(p_k),  H(p) = −Σ_m p^m log p^m (nats, mean over the batch).

    Pereyra, Tucker, Chorowski, Kaiser & Hinton 2017, "Regularizing neural networks by
    penalizing confident output distributions" (the confidence penalty, the paper's ref. [17]).
    The paper's Table 5 row cites ref. [4] (Entropy-SGD, which maximises the *local entropy
    of the loss landscape*, an optimiser rather than a loss term); docs/methods.md reads the row as
    this posterior-entropy penalty, which is what Sec. 4.8's "blind high-entropy preference"
    describes. Peers do not interact: any cohort size, each peer is an independent baseline.

    Default β = 0.2. The paper gives no value. For a net that fits its training set, the
    per-example optimum of CE − β·H (true class p_y, the rest spread evenly) on 100 classes
    has p_y ≈ 0.82 and H ≈ 1.3 nats at β = 0.2: the order of the mean training entropy the
    paper measures for DML (1.71 nats vs 0.26 independent, ResNet-32 on CIFAR-100), so the
    comparison is between posteriors of similar entropy. β = 0.1 barely moves that optimum
    (p_y ≈ 0.996, H ≈ 0.05) and β = 0.3 already flattens it (p_y ≈ 0.64, H ≈ 2.3). The optimum
    depends on the class count (751 Market-1501 identities: p_y ≈ 0.68 at β = 0.2), so tune β
    per dataset with `--method_args=beta=...`.

    Reported terms: "ce", "entropy" (H, unweighted) and "total" = ce − β·entropy.
    """

    name = "entropy_reg"
    min_peers = 1
    mutual = False  # no term between peers

    def __init__(self, beta=0.2, label_smoothing=0.0):
        """Args:
          beta: β ≥ 0, weight of the entropy bonus (0 gives `independent`).
          label_smoothing: ε of the cross-entropy targets.
        """
        super().__init__(label_smoothing=label_smoothing)
        self.beta = base.hyperparameter(beta, "beta", "a number >= 0", lambda v: v >= 0)

    def losses(self, logits, labels, *, label_mask=None, features=None):
        """Per-peer {"ce", "entropy", "total"}; args as `base.Method.losses`.

        The cross-entropy covers the labelled examples (label_mask); the entropy needs no
        label, so it covers every example.
        """
        self.check_cohort_size(len(logits))
        out = []
        for logits_k in logits:
            ce = losses.cross_entropy(labels, logits_k, label_smoothing=self.label_smoothing,
                                      mask=label_mask)
            entropy = losses.entropy(logits_k)
            out.append({"ce": ce, "entropy": entropy, "total": ce - self.beta * entropy})
        return out
