"""KDCL: online distillation from one ensemble teacher built from the cohort.

Guo, Wang, Wu, Yu, Liang, Hu, Luo, "Online Knowledge Distillation via Collaborative
Learning", CVPR 2020. Every peer k learns

    L_k = CE(z_k, y) + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_k/T)),

from one teacher z_t built from all the peers' logits and treated as a constant
(tf.stop_gradient): a peer's loss changes only its own weights. T (`temperature`,
default 2) and λ (`weight`, default 1) are hyperparameters; the T² keeps the gradient
of the distillation term at the scale of the cross-entropy's (Hinton et al. 2015).
"mimicry" is the whole added term λ·T²·KL.

The four teachers differ only in how z_t is built (see each class). Teachers that use
labels use the hard labels (the paper's CE, no label smoothing), and with a
`label_mask` (semi-supervised, DML Sec. 3.4) only the labelled examples; the
distillation term covers every example.

With the "sequential" update order the cohort asks for the losses once per peer, after
the previous peers were updated, so the teacher is rebuilt from the freshest logits.
"""

import abc
import itertools

import numpy as np
import tensorflow as tf

from dml_tf import losses
from dml_tf.errors import UserError
from dml_tf.methods import base


def distillation_loss(teacher_logits, student_logits, temperature, *, mask=None):
    """T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), summed over classes, mean over the batch.

    Hinton et al. 2015, the distillation term of KDCL. The teacher is wrapped in
    tf.stop_gradient here as well, so the term never trains the teacher's peers.

    Args:
      teacher_logits: float [B, M] z_t.
      student_logits: float [B, M] z_s.
      temperature: T > 0.
      mask: optional [B] of 0/1 selecting the examples averaged over.

    Returns:
      Scalar float32.
    """
    t = float(temperature)
    teacher = tf.stop_gradient(tf.cast(teacher_logits, tf.float32))
    target = tf.nn.softmax(teacher / t)
    return (t * t) * losses.kl_divergence(target, tf.cast(student_logits, tf.float32) / t,
                                          mask=mask)


def _example_weights(labels, label_mask):
    """a_b of the batch mean over labelled examples: 1/B, or mask/Σmask (0 if none)."""
    if label_mask is None:
        batch = tf.shape(labels)[0]
        return tf.fill([batch], 1.0 / tf.cast(batch, tf.float32))
    mask = tf.cast(label_mask, tf.float32)
    return tf.math.divide_no_nan(mask, tf.reduce_sum(mask))


def _per_peer_ce(stacked, onehot, weights):
    """[K] hard-label cross-entropies of the peers, weighted mean over the batch."""
    per_example = -tf.reduce_sum(onehot * tf.nn.log_softmax(stacked), axis=-1)  # [K, B]
    return tf.linalg.matvec(per_example, weights)


class _KDCL(base.Method, abc.ABC):
    """Shared loss of the KDCL methods; subclasses build the teacher logits."""

    min_peers = 2

    def __init__(self, temperature=2.0, weight=1.0, label_smoothing=0.0):
        """Args:
          temperature: T > 0 of the softened distributions.
          weight: λ ≥ 0, the weight of the distillation term.
          label_smoothing: ε of the peers' cross-entropy targets.
        """
        super().__init__(label_smoothing=label_smoothing)
        self.temperature = base.hyperparameter(temperature, "temperature", "a positive number", lambda v: v > 0)
        self.weight = base.hyperparameter(weight, "weight", "a number >= 0", lambda v: v >= 0)

    @abc.abstractmethod
    def teacher(self, logits, labels, *, label_mask=None):
        """Teacher logits z_t [B, M] from the peers' logits (already constants)."""

    def losses(self, logits, labels, *, label_mask=None, features=None):
        """L_k = CE_k + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_k/T)); see `base.Method.losses`."""
        self.check_cohort_size(len(logits))
        logits = [tf.cast(z, tf.float32) for z in logits]
        # Every peer learns from the teacher; no peer may be trained through it.
        constants = [tf.stop_gradient(z) for z in logits]
        teacher = tf.stop_gradient(self.teacher(constants, labels, label_mask=label_mask))
        out = []
        for logits_k in logits:
            ce = losses.cross_entropy(labels, logits_k, label_smoothing=self.label_smoothing,
                                      mask=label_mask)
            mimicry = self.weight * distillation_loss(teacher, logits_k, self.temperature)
            out.append({"ce": ce, "mimicry": mimicry, "total": ce + mimicry})
        return out


class KDCLNaive(_KDCL):
    """KDCL-Naive: z_t = z_j with j = argmin_k CE(z_k, y) on this batch.

    L_k = CE_k + λ·T²·KL(softmax(z_j/T) ‖ softmax(z_k/T)); the best peer of the batch
    teaches all (its own term is 0). Ties, and a batch without labelled examples,
    go to the lowest peer number.
    """

    name = "kdcl_naive"

    def teacher(self, logits, labels, *, label_mask=None):
        stacked = tf.stack(logits)
        onehot = tf.one_hot(tf.cast(labels, tf.int32), tf.shape(stacked)[-1])
        ce = _per_peer_ce(stacked, onehot, _example_weights(labels, label_mask))
        return tf.gather(stacked, tf.argmin(ce, output_type=tf.int32))


class KDCLLinear(_KDCL):
    """KDCL-Linear: z_t = Σ_k w_k z_k with w = argmin_{w ≥ 0, Σw = 1} CE(Σ_k w_k z_k, y).

    L_k = CE_k + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_k/T)), w solved afresh on every
    batch. f(w) = CE(Σ w z, y) is convex in w (a convex function of an affine map), so
    a local solver finds the batch optimum. The paper leaves the solver open ("convex
    optimization"); here, inside the graph, `NEWTON_STEPS` = 8 projected Newton steps
    from uniform weights 1/K (a tf.while_loop):

    1. the quadratic model f(w) + gᵀd + ½dᵀHd (g, H the K-vector and K×K matrix of
       first and second derivatives, plus a ridge of 1e-5·tr(H)/K + 1e-9 so that every
       KKT system below is invertible, e.g. for identical peers) is minimised
       exactly over the simplex: for each of the 2^K − 1 supports S, the KKT system
       of "minimise on the face of S with Σw = 1" is solved (batched
       tf.linalg.solve); the feasible (w ≥ 0) solution with the lowest model value
       is the simplex minimiser v;
    2. line search: of w + t(v − w) for t = 1, ½, …, 2⁻¹¹ the lowest CE is taken if it
       is below f(w), so the CE never increases.

    Near the optimum the steps are full Newton steps (quadratic convergence); the
    exact model minimisation makes it indifferent to the scale and conditioning of
    the logits, where first-order methods stall. Finally, if a single peer (a vertex)
    has a lower CE, its one-hot weights are used, so the teacher is never worse on
    the batch than `kdcl_naive`'s. Cost per batch: 8 × (2^K − 1) (K+1)×(K+1) solves
    plus 8 × 13 evaluations of the CE on [B, M], small beside the networks for the
    cohort sizes KDCL uses (2–4).

    With p = softmax(Σ w z) and a_b = 1/B (or the label mask over its sum):
    g_k = Σ_b a_b Σ_m (p_bm − y_bm) z_k,bm and
    H_kl = Σ_b a_b (Σ_m p_bm z_k,bm z_l,bm − (Σ_m p_bm z_k,bm)(Σ_m p_bm z_l,bm)).
    """

    name = "kdcl_linear"
    NEWTON_STEPS = 8
    STEP_LENGTHS = tuple(0.5 ** i for i in range(12))

    def teacher(self, logits, labels, *, label_mask=None):
        weights = self.solve_weights(logits, labels, label_mask=label_mask)
        return tf.einsum("k,kbm->bm", weights, tf.stack(logits))

    def solve_weights(self, logits, labels, *, label_mask=None):
        """The simplex weights [K] minimising CE(Σ w z, y) on the batch (see class doc)."""
        stacked = tf.stop_gradient(tf.stack([tf.cast(z, tf.float32) for z in logits]))
        num_peers = len(logits)
        onehot = tf.one_hot(tf.cast(labels, tf.int32), tf.shape(stacked)[-1])
        a = _example_weights(labels, label_mask)
        # Every non-empty support, as 0/1 rows [S, K]; K is known when tracing.
        supports = tf.constant(
            [s for s in itertools.product((0.0, 1.0), repeat=num_peers) if any(s)], tf.float32)
        lengths = tf.constant(self.STEP_LENGTHS, tf.float32)

        def objective(candidates):
            """f at each row of candidates [N, K] -> [N]."""
            log_p = tf.nn.log_softmax(tf.einsum("nk,kbm->nbm", candidates, stacked))
            return -tf.linalg.matvec(tf.reduce_sum(onehot * log_p, axis=-1), a)

        def model_minimiser(w):
            p = tf.nn.softmax(tf.einsum("k,kbm->bm", w, stacked))
            g = tf.einsum("bm,kbm->k", a[:, None] * (p - onehot), stacked)
            mean_z = tf.einsum("bm,kbm->kb", p, stacked)
            h = (tf.einsum("kbm,lbm->kl", stacked * (a[:, None] * p), stacked)
                 - tf.einsum("kb,lb->kl", mean_z * a, mean_z))
            ridge = 1e-5 * tf.linalg.trace(h) / num_peers + 1e-9
            h = 0.5 * (h + tf.transpose(h)) + ridge * tf.eye(num_peers)
            # The model in absolute coordinates v: ½vᵀHv + cᵀv + const, c = g − Hw.
            c = g - tf.linalg.matvec(h, w)
            m = supports
            # Off the support, v_i = 0 (identity rows); on it, H_SS v_S + c_S + μ1 = 0.
            block = m[:, :, None] * h * m[:, None, :] + tf.linalg.diag(1.0 - m)
            kkt = tf.concat([tf.concat([block, m[:, :, None]], axis=2),
                             tf.concat([m, tf.zeros_like(m[:, :1])], axis=1)[:, None, :]], axis=1)
            rhs = tf.concat([-m * c, tf.ones_like(m[:, :1])], axis=1)[:, :, None]
            v = tf.linalg.solve(kkt, rhs)[:, :num_peers, 0] * m
            value = 0.5 * tf.einsum("sk,kl,sl->s", v, h, v) + tf.linalg.matvec(v, c)
            # Single-peer supports are always feasible, so some row survives.
            feasible = tf.reduce_all(v >= -1e-6, axis=1) & tf.reduce_all(tf.math.is_finite(v), axis=1)
            best = tf.gather(v, tf.argmin(tf.where(feasible, value, np.inf)))
            best = tf.maximum(best, 0.0)  # round-off below 0
            return best / tf.reduce_sum(best)

        def body(i, w, f):
            v = model_minimiser(w)
            candidates = w[None, :] + lengths[:, None] * (v - w)[None, :]
            values = objective(candidates)
            j = tf.argmin(values)
            accept = values[j] < f
            return i + 1, tf.where(accept, candidates[j], w), tf.where(accept, values[j], f)

        w0 = tf.fill([num_peers], 1.0 / num_peers)
        _, w, f = tf.while_loop(lambda i, *_: i < self.NEWTON_STEPS, body,
                                (tf.constant(0), w0, objective(w0[None, :])[0]))
        vertex_ce = _per_peer_ce(stacked, onehot, a)
        best = tf.argmin(vertex_ce, output_type=tf.int32)
        vertex = tf.one_hot(best, num_peers)
        return tf.stop_gradient(tf.where(tf.gather(vertex_ce, best) < f, vertex, w))


class KDCLMinLogit(_KDCL):
    """KDCL-MinLogit: z_t^m = min_k (z_k^m − z_k^y), the element-wise minimum.

    L_k = CE_k + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_k/T)). Subtracting the target logit
    makes the target entry 0 for every peer (softmax is unchanged by the shift), so
    each non-target entry of z_t is the one of the peer most confident against that
    class: the teacher's target probability is at least every peer's.

    Unlabelled examples (label_mask 0) have no y; for them the class with the highest
    mean logit over the peers stands in for it.
    """

    name = "kdcl_minlogit"

    def teacher(self, logits, labels, *, label_mask=None):
        stacked = tf.stack(logits)
        labels = tf.cast(labels, tf.int32)
        if label_mask is not None:
            guess = tf.argmax(tf.reduce_mean(stacked, axis=0), axis=-1, output_type=tf.int32)
            labels = tf.where(tf.cast(label_mask, tf.bool), labels, guess)
        onehot = tf.one_hot(labels, tf.shape(stacked)[-1])
        target_logit = tf.reduce_sum(stacked * onehot, axis=-1, keepdims=True)  # [K, B, 1]
        return tf.reduce_min(stacked - target_logit, axis=0)


class KDCLGeneral(_KDCL):
    """KDCL-General: z_t = Σ_k w_k z_k, w = C⁻¹1 / 1ᵀC⁻¹1 from held-out errors.

    L_k = CE_k + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_k/T)). The weights minimise the
    ensemble's generalisation error Σ_ij w_i w_j C_ij subject to Σw = 1 (the
    generalised ensemble method of Perrone & Cooper 1993, which KDCL follows), where

        C_ij = 1/N Σ_n e_i(n) e_j(n),   e_k(n) = 1 − p_k(n)[y_n],

    on a held-out split of the training set (`--val_fraction`), re-estimated every
    epoch. C is the matrix of second moments of the errors (the paper's
    ∫(f_i − t)(f_j − t) p(x) dx), not mean-centred: centring would drop each peer's
    average error, so a peer that is always wrong by the same amount would look
    perfect. A ridge of 1e-6·(tr C / K) + 1e-12 is added to the diagonal so that C is
    invertible (identical peers, or peers with no error). The weights are not
    constrained to be non-negative, as in the closed form.

    The weights live in the non-trainable tf.Variable `teacher_weights` (uniform 1/K
    until the first `update_weights`), which `losses` reads inside the compiled step, so
    new weights take effect without retracing.

    Lifecycle (methods.base.Method, driven by dml_tf.lifecycle for both training paths):
    `needs_validation` asks for held-out data; before every epoch `update_weights` gets
    the peers' held-out probabilities (inference mode); `summaries()` is logged.
    """

    name = "kdcl_general"
    needs_validation = True
    RIDGE = 1e-6

    def __init__(self, temperature=2.0, weight=1.0, label_smoothing=0.0):
        super().__init__(temperature=temperature, weight=weight, label_smoothing=label_smoothing)
        self.teacher_weights = None

    def check_cohort_size(self, num_peers):
        """Also creates the weights variable (uniform 1/K) the first time K is known."""
        super().check_cohort_size(num_peers)
        if self.teacher_weights is None:
            # Lifted out of any tf.function being traced: the variable must outlive it.
            with tf.init_scope():
                self.teacher_weights = tf.Variable(
                    tf.fill([num_peers], 1.0 / num_peers), trainable=False,
                    name="kdcl_general_weights")
        elif self.teacher_weights.shape[0] != num_peers:
            raise UserError(
                f"--method=kdcl_general was set up for {self.teacher_weights.shape[0]} networks "
                f"but got {num_peers}; build a new method for a different cohort.")

    def teacher(self, logits, labels, *, label_mask=None):
        weights = tf.cast(self.teacher_weights, tf.float32)
        return tf.einsum("k,kbm->bm", weights, tf.stack(logits))

    def update_weights(self, peer_probs, labels):
        """Re-estimates w = C⁻¹1 / 1ᵀC⁻¹1 from held-out predictions and stores it.

        Args:
          peer_probs: list of K numpy [N, M] class probabilities (one per peer) on the
            held-out split.
          labels: numpy int [N].

        Returns:
          The new weights, numpy float64 [K] (summing to 1).

        Raises:
          UserError: no held-out examples, mismatched shapes or non-finite predictions.
        """
        probs = [np.asarray(p, np.float64) for p in peer_probs]
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        self.check_cohort_size(len(probs))
        n = labels.shape[0]
        if n == 0:
            raise UserError("kdcl_general needs held-out examples; raise --val_fraction above 0.")
        if any(p.ndim != 2 or p.shape[0] != n for p in probs):
            raise UserError(f"kdcl_general needs [N, M] probabilities for each of the {n} "
                            "held-out labels; pass one array per peer.")
        if not all(np.all(np.isfinite(p)) for p in probs):
            raise UserError("kdcl_general got NaN or infinite held-out predictions; the "
                            "training diverged, lower the learning rate.")
        errors = np.stack([1.0 - p[np.arange(n), labels] for p in probs], axis=1)  # [N, K]
        num_peers = errors.shape[1]
        c = errors.T @ errors / n
        c += (self.RIDGE * np.trace(c) / num_peers + 1e-12) * np.eye(num_peers)
        c_inv_1 = np.linalg.solve(c, np.ones(num_peers))
        weights = c_inv_1 / c_inv_1.sum()
        self.teacher_weights.assign(weights.astype(np.float32))
        return weights

    def summaries(self):
        """{"kdcl/weight{k}": w_k} for k = 1..K, for TensorBoard ({} before K is known)."""
        if self.teacher_weights is None:
            return {}
        return {f"kdcl/weight{k}": float(w)
                for k, w in enumerate(self.teacher_weights.numpy(), start=1)}
