"""The paper's published numbers, as data, keyed like our results.json (percent).

Transcribed from Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018
(arXiv 1706.00384): Table 2 (CIFAR-10/100 top-1, six pairs), Table 3 (Market-1501, mean of
the two MobileNets), Table 4 (distillation vs DML) and Table 5 (entropy and L2 baselines on
Market-1501), and the training-set entropies of Sec. 4.8. Metric names are those of
results.json (docs/design.md): "test/peer{k}/top1", "test/peer{k}/mAP", "test/mean/mAP",
"test/mean/rank1", and the multi-query "test/mean/mq_mAP", "test/mean/mq_rank1".

Where the tables disagree the entry keeps both, each under its own metric:
  * Market-1501, MobileNet pair: Table 4 gives per-net mAP (independent 50.15 / 49.87, DML
    55.28 / 54.13), Table 3 the mean (independent 50.15, not their mean 50.01; DML 54.71).
  * kd ("1 distills 2"): peer 1 is the pre-trained teacher, so its number is Table 4's
    "Independent Net 1".
Table 4's Market-1501 rows and Table 5 are read as trained from scratch (their independent
MobileNet, 50.15, is Table 3's "pre? no" row).
"""

# (dataset, nets, method, pretrained) -> (source, {metric: percent})
_ENTRIES = {}


def _add(dataset, nets, method, source, metrics, pretrained=False):
    key = (dataset, tuple(nets), method, pretrained)
    entry = _ENTRIES.setdefault(key, ({}, {}))
    for name, value in metrics.items():
        entry[0][name] = source
        entry[1][name] = value


def _peers(metric, *values):
    return {f"test/peer{k}/{metric}": v for k, v in enumerate(values, start=1)}


# Table 2: top-1 (%), Net 1 and Net 2 of each pair: independent, then DML.
_TABLE2 = {
    "cifar10": [
        (("resnet32", "resnet32"), (92.47, 92.47), (92.68, 92.80)),
        (("wrn28_10", "resnet32"), (95.01, 92.47), (95.75, 93.18)),
        (("mobilenet", "resnet32"), (93.59, 92.47), (94.24, 93.32)),
        (("mobilenet", "mobilenet"), (93.59, 93.59), (94.10, 94.30)),
        (("wrn28_10", "mobilenet"), (95.01, 93.59), (95.73, 94.37)),
        (("wrn28_10", "wrn28_10"), (95.01, 95.01), (95.66, 95.63)),
    ],
    "cifar100": [
        (("resnet32", "resnet32"), (68.99, 68.99), (71.19, 70.75)),
        (("wrn28_10", "resnet32"), (78.69, 68.99), (78.96, 70.73)),
        (("mobilenet", "resnet32"), (73.65, 68.99), (76.13, 71.10)),
        (("mobilenet", "mobilenet"), (73.65, 73.65), (76.21, 76.10)),
        (("wrn28_10", "mobilenet"), (78.69, 73.65), (80.28, 77.39)),
        (("wrn28_10", "wrn28_10"), (78.69, 78.69), (80.28, 80.08)),
    ],
}
for _dataset, _rows in _TABLE2.items():
    for _nets, _independent, _dml in _rows:
        _add(_dataset, _nets, "independent", "Table 2", _peers("top1", *_independent))
        _add(_dataset, _nets, "dml", "Table 2", _peers("top1", *_dml))

# An independently trained net's accuracy does not depend on its partner (Table 2 repeats
# it in every pair): the per-network numbers, for independent cohorts of any make-up.
INDEPENDENT_TOP1 = {
    "cifar10": {"resnet32": 92.47, "mobilenet": 93.59, "wrn28_10": 95.01},
    "cifar100": {"resnet32": 68.99, "mobilenet": 73.65, "wrn28_10": 78.69},
}

# Table 3: Market-1501, two MobileNets, the mean of the two; single- and multi-query.
for _pretrained, _independent, _dml in (
        (False, (50.15, 76.87, 60.16, 84.06), (54.71, 79.12, 64.10, 85.63)),
        (True, (65.06, 85.01, 74.53, 90.59), (70.51, 89.34, 78.95, 92.81))):
    for _method, (_map, _rank1, _mq_map, _mq_rank1) in (("independent", _independent),
                                                        ("dml", _dml)):
        _add("market1501", ("mobilenet", "mobilenet"), _method, "Table 3",
             {"test/mean/mAP": _map, "test/mean/rank1": _rank1,
              "test/mean/mq_mAP": _mq_map, "test/mean/mq_rank1": _mq_rank1},
             pretrained=_pretrained)

# Table 4: distillation ("1 distills 2": Net 1 a fixed pre-trained teacher) vs DML.
# CIFAR-100 top-1 (%): its independent and DML columns repeat Table 2.
for _nets, _teacher, _student in ((("wrn28_10", "resnet32"), 78.69, 69.48),
                                  (("mobilenet", "resnet32"), 73.65, 69.12)):
    _add("cifar100", _nets, "kd", "Table 4", _peers("top1", _teacher, _student))
# Market-1501 mAP (%), per net.
for _nets, _independent, _kd_student, _dml in (
        (("inception_v1", "mobilenet"), (63.91, 50.15), 52.30, (64.42, 58.47)),
        (("mobilenet", "mobilenet"), (50.15, 49.87), 50.07, (55.28, 54.13))):
    _add("market1501", _nets, "independent", "Table 4", _peers("mAP", *_independent))
    _add("market1501", _nets, "kd", "Table 4", _peers("mAP", _independent[0], _kd_student))
    _add("market1501", _nets, "dml", "Table 4", _peers("mAP", *_dml))

# Table 5: Market-1501 single query, MobileNets (mean of the pair, as Table 3).
_add("market1501", ("mobilenet", "mobilenet"), "entropy_reg", "Table 5",
     {"test/mean/mAP": 50.94, "test/mean/rank1": 76.34})
_add("market1501", ("mobilenet", "mobilenet"), "dml_l2", "Table 5",
     {"test/mean/mAP": 51.01, "test/mean/rank1": 77.58})

# Sec. 4.8: mean posterior entropy (nats) over the CIFAR-100 training set, ResNet-32
# trained by DML or independently (one number per training method, not per peer).
TRAIN_ENTROPY = {("cifar100", "resnet32", "dml"): 1.7099,
                 ("cifar100", "resnet32", "independent"): 0.2602}

# Methods whose peers play symmetric roles: a pair listed in the other order matches with
# its peers swapped (kd's peer 1 is the teacher: no swap).
_SYMMETRIC = ("independent", "dml")
# Methods whose peers never interact: each peer's number is its network's alone.
_PER_NETWORK = ("independent",)


def lookup(dataset, nets, method, pretrained=False):
    """The paper's numbers for a run, or None where the paper has no such experiment.

    Args:
      dataset: the run's --dataset (cifar10, cifar100, market1501, ...).
      nets: the run's networks, peer 1 first.
      method: the run's --method.
      pretrained: whether the networks started from ImageNet weights (Table 3's "pre?").

    Returns:
      (metrics, sources): dicts metric name -> percent and metric name -> the table it comes
      from, or None.
    """
    nets = tuple(nets)
    metrics, sources = {}, {}
    found = _ENTRIES.get((dataset, nets, method, pretrained))
    if found is None and method in _SYMMETRIC and len(nets) == 2:
        swapped = _ENTRIES.get((dataset, nets[::-1], method, pretrained))
        if swapped is not None:
            found = tuple({_swap_peers(k): v for k, v in d.items()} for d in swapped)
    if found is not None:
        sources.update(found[0])
        metrics.update(found[1])
    if method in _PER_NETWORK and not pretrained and dataset in INDEPENDENT_TOP1:
        table = INDEPENDENT_TOP1[dataset]
        for k, net in enumerate(nets, start=1):
            if net in table and f"test/peer{k}/top1" not in metrics:
                metrics[f"test/peer{k}/top1"] = table[net]
                sources[f"test/peer{k}/top1"] = "Table 2"
    return (metrics, sources) if metrics else None


def _swap_peers(name):
    return name.replace("peer1", "peer#").replace("peer2", "peer1").replace("peer#", "peer2")


def train_entropy(dataset, net, method):
    """The paper's mean training-set posterior entropy (nats) for one network, or None."""
    return TRAIN_ENTROPY.get((dataset, net, method))
