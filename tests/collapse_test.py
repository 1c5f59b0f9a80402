"""Collapse detection: the rule on its own, and a real tiny cohort driven to uniform predictions."""

import dataclasses
import math

import numpy as np
import pytest

from dml_tf import collapse
from dml_tf import config as config_lib
from dml_tf import train_lib
from dml_tf.errors import UserError

LOG4 = math.log(4)


def _means(*peers):
    out = {}
    for k, (entropy, ce) in enumerate(peers, start=1):
        out[f"train/peer{k}/entropy"], out[f"train/peer{k}/ce"] = entropy, ce
    return out


STEPS = collapse.MIN_STEPS  # enough steps behind the epoch for near-uniform to mean stuck


def test_all_peers_near_uniform_is_a_collapse():
    found = collapse.collapsed_peers(_means((0.99 * LOG4, LOG4), (0.97 * LOG4, 1.01 * LOG4)), 4, 2,
                                     STEPS, prefix="train/")
    assert [k for k, _, _ in found] == [1, 2]
    line = collapse.describe(found, 4, 3, STEPS, "try --warmup_epochs=2")
    assert f"after epoch 3 ({STEPS} steps)" in line and "peer 2 entropy" in line
    assert "log M = 1.386" in line and "--warmup_epochs=2" in line
    assert "mutual mimicry" in line
    # Independent training and kd have no mimicry between peers to blame.
    assert "mimicry" not in collapse.describe(found, 4, 3, STEPS, "x", mutual=False)


def test_near_uniform_before_enough_steps_is_not_a_collapse():
    """Every fresh network predicts near uniform: a smoke run's first epoch is not stuck."""
    means = _means((0.99 * LOG4, LOG4), (0.99 * LOG4, LOG4))
    assert collapse.collapsed_peers(means, 4, 2, STEPS - 1, prefix="train/") == []
    assert len(collapse.collapsed_peers(means, 4, 2, STEPS, prefix="train/")) == 2


@pytest.mark.parametrize("peers", [
    ((0.99 * LOG4, LOG4), (0.5 * LOG4, 0.6 * LOG4)),  # one peer learns: no collapse
    ((0.99 * LOG4, 0.5 * LOG4), (0.99 * LOG4, 0.5 * LOG4)),  # confident-looking CE: learning
    ((0.90 * LOG4, LOG4), (0.99 * LOG4, LOG4)),  # entropy below 95 % of log M
])
def test_anything_short_of_every_peer_uniform_is_not(peers):
    assert collapse.collapsed_peers(_means(*peers), 4, 2, STEPS, prefix="train/") == []


def test_missing_metrics_are_not_a_collapse():
    assert collapse.collapsed_peers({"train/peer1/ce": LOG4}, 4, 1, STEPS, prefix="train/") == []


def _npz(path, learnable, train=80):
    """Random images; labels either independent of the images (nothing to learn: the cohort
    can only predict the uniform prior) or written into the images' brightness."""
    rng = np.random.default_rng(0)
    labels = np.arange(train + 16) % 4
    rng.shuffle(labels)
    x = rng.integers(0, 256, (train + 16, 16, 16, 3), dtype=np.uint8)
    if learnable:
        x = np.clip(x // 4 + 60 * labels[:, None, None, None], 0, 255).astype(np.uint8)
    np.savez(path, x_train=x[:train], y_train=labels[:train], x_test=x[train:],
             y_test=labels[train:])
    return str(path)


def _config(tmp_path, data, **overrides):
    base = config_lib.Config(dataset="npz", data_dir=data, nets=("tiny", "tiny"), method="dml",
                             batch_size=8, epochs=2, learning_rate=0.05, weight_decay=0.0,
                             export=False, model_dir=str(tmp_path / "run"))
    return dataclasses.replace(base, **overrides)


def test_a_cohort_of_uniform_predictors_is_warned_of_and_stopped(tmp_path, capsys):
    data = _npz(tmp_path / "noise.npz", learnable=False)
    # 10 steps an epoch: the rule may fire from the epoch that reaches MIN_STEPS steps.
    first = -(-STEPS // 10)
    results = train_lib.train_and_evaluate(_config(tmp_path, data, epochs=first + 1))
    err = capsys.readouterr().err
    assert f"warning: Collapse: after epoch {first} ({first * 10} steps) every peer still" in err
    assert f"after epoch {first - 1} " not in err
    for k in (1, 2):
        assert results[f"train/peer{k}/entropy"] > 0.95 * LOG4
    stopped = tmp_path / "stopped"
    with pytest.raises(UserError, match=f"Collapse: after epoch {first} .*training stopped and "
                                        "the last checkpoint, .*ckpt-.*, is kept"):
        train_lib.train_and_evaluate(dataclasses.replace(
            _config(tmp_path, data, on_collapse="stop", epochs=first + 1), model_dir=str(stopped)))


def test_a_stop_in_the_first_epoch_says_no_checkpoint_was_written(tmp_path):
    data = _npz(tmp_path / "noise.npz", learnable=False, train=8 * STEPS)  # STEPS steps an epoch
    with pytest.raises(UserError, match="Collapse: after epoch 1 .*training stopped and no "
                                        "checkpoint was written yet"):
        train_lib.train_and_evaluate(_config(tmp_path, data, on_collapse="stop"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_smoke_run_that_has_not_learned_yet_is_not_a_collapse(tmp_path, capsys):
    """A 5-step epoch of peers that have not learned anything yet is no evidence of being
    stuck: no warning, and on_collapse=stop trains on."""
    data = _npz(tmp_path / "noise.npz", learnable=False)
    results = train_lib.train_and_evaluate(_config(tmp_path, data, steps_per_epoch=5, epochs=2,
                                                   on_collapse="stop"))
    assert "Collapse" not in capsys.readouterr().err
    assert results["test/ensemble/top1"] >= 0.0  # trained to the end: nothing stopped it


def test_a_learning_cohort_is_not_warned_of(tmp_path, capsys):
    data = _npz(tmp_path / "signal.npz", learnable=True)
    train_lib.train_and_evaluate(_config(tmp_path, data, epochs=3, learning_rate=0.1))
    assert "Collapse" not in capsys.readouterr().err


def _keras_data(learnable):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(128, 6)).astype(np.float32)
    if learnable:
        return x, (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    # Near-zero inputs and random labels: nothing to learn, the peers sit at the uniform prior.
    return 0.01 * x, rng.integers(0, 4, 128)


def _mutual(on_collapse="warn"):
    import dml_tf
    import keras
    peers = [keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                               keras.layers.Dense(4)]) for _ in range(2)]
    model = dml_tf.MutualLearning(peers, on_collapse=on_collapse)
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    return model


def test_mutual_learning_fit_warns_of_and_stops_at_a_collapse(capsys):
    x, y = _keras_data(learnable=False)  # 128 examples, batch 16: 8 steps an epoch
    first = -(-STEPS // 8)
    history = _mutual().fit(x, y, batch_size=16, epochs=first + 1, verbose=0)
    assert history.history["collapsed"] == [0.0] * (first - 1) + [1.0, 1.0]
    assert f"warning: Collapse: after epoch {first} ({first * 8} steps)" in capsys.readouterr().err
    stopped = _mutual("stop").fit(x, y, batch_size=16, epochs=first + 3, verbose=0)
    assert len(stopped.history["collapsed"]) == first


def test_mutual_learning_fit_short_smoke_run_is_not_a_collapse(capsys):
    x, y = _keras_data(learnable=False)
    history = _mutual("stop").fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert history.history["collapsed"] == [0.0, 0.0]
    assert "Collapse" not in capsys.readouterr().err


def test_mutual_learning_fit_on_a_learnable_task_is_not_a_collapse(capsys):
    x, y = _keras_data(learnable=True)
    history = _mutual().fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert history.history["collapsed"][-1] == 0.0
    assert "Collapse" not in capsys.readouterr().err
