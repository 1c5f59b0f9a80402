"""Knowledge distillation from a fixed, pre-trained teacher (Hinton et al. 2015).

The baseline of the paper's Table 4 ("1 distills 2", Sec. 4.6): Net 1 is trained first,
then frozen, and Net 2 learns from its posteriors.
"""

import tensorflow as tf

from dml_tf import losses
from dml_tf.methods import base


class Distillation(base.Method):
    """Peer 1 is a fixed teacher; every other peer k ≥ 2 is a student of it.

    Student k:  L_k = CE_k + T²·KL(softmax(z_1/T) ‖ softmax(z_k/T)),
    with the teacher's z_1 a constant (Hinton, Vinyals & Dean 2015, "Distilling the knowledge
    in a neural network"; paper Table 4, "1 distills 2"). The T² keeps the soft term's
    gradient on the scale of the cross-entropy's when T changes (Hinton et al., Sec. 2); the
    paper's comparison uses T = 1, where the term is exactly DML's KL(p_1 ‖ p_k) with p_1 fixed.

    Teacher: its dict holds its own cross-entropy as "ce" and "total", for the logs only:
    `frozen_peers = (0,)` tells the cohort never to update it and to run it in inference mode.
    Its weights come from a trained teacher, which the method lifecycle loads (`needs_teacher`).

    Declares (methods.base.Method): `frozen_peers = (0,)`, `needs_teacher`.
    """

    name = "kd"
    min_peers = 2
    frozen_peers = (0,)
    needs_teacher = True
    mutual = False  # the students learn from a fixed teacher, not from each other

    def __init__(self, temperature=1.0, label_smoothing=0.0):
        """Args:
          temperature: T > 0 of both softmaxes of the distillation term (1 in the paper).
          label_smoothing: ε of the students' (and the reported teacher's) cross-entropy.
        """
        super().__init__(label_smoothing=label_smoothing)
        self.temperature = base.hyperparameter(temperature, "temperature", "a positive number",
                                               lambda v: v > 0)

    def losses(self, logits, labels, *, label_mask=None, features=None):
        """Per-peer losses: the teacher's {"ce", "total"}, the students' {"ce", "mimicry", "total"}.

        Args are those of `base.Method.losses`; `features` is ignored. The distillation term
        covers every example, labelled or not (as DML's mimicry, paper Sec. 3.4).
        """
        self.check_cohort_size(len(logits))
        t = self.temperature
        # The teacher is fixed: its posteriors are targets, never a path for gradients.
        teacher = tf.stop_gradient(tf.nn.softmax(tf.cast(logits[0], tf.float32) / t))
        out = []
        for k, logits_k in enumerate(logits):
            ce = losses.cross_entropy(labels, logits_k, label_smoothing=self.label_smoothing,
                                      mask=label_mask)
            if k == 0:
                out.append({"ce": ce, "total": ce})
                continue
            mimicry = (t * t) * losses.kl_divergence(teacher, tf.cast(logits_k, tf.float32) / t)
            out.append({"ce": ce, "mimicry": mimicry, "total": ce + mimicry})
        return out
