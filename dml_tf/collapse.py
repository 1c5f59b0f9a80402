"""Collapse detection: a cohort whose peers all sit at near-uniform predictions.

Once every peer predicts ~1/M for every class (typically after the first steps blew up at a
learning rate too high for the start), each peer's KL term pulls it back toward its uniform
peers, against the cross-entropy's pull toward the labels: the cohort leaves that state slowly
if at all (on real CIFAR-10 at lr 0.1, a ResNet-32 pair sat there for 7 of 12 epochs). Nothing else tells the user: the run "succeeds" at chance accuracy. This module
only reads epoch means of the step metrics that the cohort reports (`peer{k}/entropy`,
`peer{k}/ce`), so the run scripts' loop and `MutualLearning.fit` share it.
"""

import math

ON_COLLAPSE = ("warn", "stop")
# An epoch's mean predictive entropy above this share of log M (the uniform distribution's)...
ENTROPY_SHARE = 0.95
# ...while the cross-entropy is this close to log M too: chance-level predictions.
CE_SHARE = 0.95


def collapsed_peers(means, num_classes, num_peers, prefix=""):
    """[(k, entropy, ce)] of every peer when ALL are collapsed, else [].

    Args:
      means: epoch means keyed f"{prefix}peer{k}/entropy" and f"{prefix}peer{k}/ce".
      num_classes: M.
      num_peers: K.
      prefix: a prefix of the keys (e.g. "train/").
    """
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


def describe(found, num_classes, epoch, fix):
    """The one-line warning: which peers, their entropy and CE, log M, the likely causes."""
    peers = "; ".join(f"peer {k} entropy {e:.3f}, CE {c:.3f}" for k, e, c in found)
    return (f"Collapse: after epoch {epoch} every peer predicts near-uniform probabilities "
            f"({peers}; log M = {math.log(num_classes):.3f}), which mutual mimicry holds "
            f"them in; likely causes: a learning rate too high for the first "
            f"steps, no warm-up ({fix}).")
