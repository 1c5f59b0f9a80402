"""Collapse detection: a cohort whose peers all sit at near-uniform predictions.

Once every peer predicts ~1/M for every class (typically after the first steps blew up at a
learning rate too high for the start), a mutual method's KL terms pull each peer back toward
its uniform peers, against the cross-entropy's pull toward the labels: the cohort leaves that
state slowly if at all (on real CIFAR-10 at lr 0.1, a ResNet-32 pair sat there for 7 of 12
epochs). Nothing else tells the user: the run "succeeds" at chance accuracy.

Every network starts near uniform, so near-uniform predictions are evidence of being stuck
only after enough updates: the rule needs `MIN_STEPS` steps of the run behind it, so a smoke
run of a few steps is never called collapsed. It reads only the epoch means of the step
metrics `peer{k}/entropy` and `peer{k}/ce`; dml_tf.lifecycle applies it for both training
paths.
"""

import math

ON_COLLAPSE = ("warn", "stop")
# An epoch's mean predictive entropy above this share of log M (the uniform distribution's)...
ENTROPY_SHARE = 0.95
# ...while the cross-entropy is this close to log M too: chance-level predictions...
CE_SHARE = 0.95
# ...after at least this many steps of the run (a fresh network is near uniform too).
MIN_STEPS = 100


def collapsed_peers(means, num_classes, num_peers, steps_done, prefix=""):
    """[(k, entropy, ce)] of every peer when ALL are collapsed, else [].

    Args:
      means: epoch means keyed f"{prefix}peer{k}/entropy" and f"{prefix}peer{k}/ce".
      num_classes: M.
      num_peers: K.
      steps_done: the run's steps so far; fewer than MIN_STEPS is never a collapse.
      prefix: a prefix of the keys (e.g. "train/").
    """
    if steps_done < MIN_STEPS:
        return []
    uniform = math.log(num_classes)
    found = []
    for k in range(1, num_peers + 1):
        entropy = means.get(f"{prefix}peer{k}/entropy")
        ce = means.get(f"{prefix}peer{k}/ce")
        if entropy is None or ce is None or not (
                entropy > ENTROPY_SHARE * uniform and ce > CE_SHARE * uniform):
            return []
        found.append((k, entropy, ce))
    return found


def describe(found, num_classes, epoch, steps_done, fix, *, mutual=True):
    """The one-line warning: which peers, their entropy and CE, log M, the likely causes.

    Args:
      mutual: whether the method has mimicry between peers (then named as what holds a
        collapsed cohort in place; independent training and kd have none).
    """
    peers = "; ".join(f"peer {k} entropy {e:.3f}, CE {c:.3f}" for k, e, c in found)
    held = ", which mutual mimicry holds them in" if mutual else ""
    return (f"Collapse: after epoch {epoch} ({steps_done} steps) every peer still predicts "
            f"near-uniform probabilities ({peers}; log M = {math.log(num_classes):.3f}){held}; "
            f"likely causes: a learning rate too high for the first steps, no warm-up ({fix}).")
