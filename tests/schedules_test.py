"""Learning-rate schedules against their formulas: the paper's staircase, the optional warm-up."""

import glob
import os

import keras
import numpy as np
import pytest

from dml_tf import schedules
from dml_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(step, initial, rate, decay_steps, warmup_steps):
    staircase = initial * rate ** np.floor(step / decay_steps)
    return staircase * min(1.0, (step + 1) / warmup_steps) if warmup_steps else staircase


@pytest.mark.parametrize("warmup_epochs", [0.0, 2.0, 0.5])
def test_staircase_with_linear_warmup_matches_the_formula(warmup_epochs):
    steps_per_epoch = 10
    lr = schedules.learning_rate(0.1, decay_rate=0.1, decay_epochs=3, steps_per_epoch=steps_per_epoch,
                                 warmup_epochs=warmup_epochs)
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    for step in (0, 1, 4, 9, 19, 20, 29, 30, 45, 61):
        expected = _reference(step, 0.1, 0.1, 30, warmup_steps)
        assert float(lr(step)) == pytest.approx(expected, rel=1e-6), step


def test_warmup_of_a_constant_rate_and_its_first_step():
    lr = schedules.learning_rate(0.2, warmup_epochs=1, steps_per_epoch=4)
    assert [float(lr(s)) for s in range(6)] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])


def test_warmup_survives_optimizer_serialisation():
    lr = schedules.learning_rate(0.1, decay_rate=0.1, decay_epochs=2, steps_per_epoch=5,
                                 warmup_epochs=1)
    optimizer = schedules.optimizer("sgd", lr)
    clone = keras.optimizers.SGD.from_config(optimizer.get_config())
    clone.build([keras.Variable(0.0)])
    for step in (0, 3, 7, 12):
        clone.iterations.assign(step)
        assert float(clone.learning_rate) == pytest.approx(float(lr(step))), step


def test_negative_warmup_is_refused():
    with pytest.raises(UserError, match="--warmup_epochs"):
        schedules.learning_rate(0.1, warmup_epochs=-1)


def test_no_paper_flagfile_warms_up():
    """The paper's schedules stay faithful: the warm-up is a deviation for short runs."""
    for path in glob.glob(os.path.join(ROOT, "flags", "**", "*.flags"), recursive=True):
        assert "warmup" not in open(path).read(), path
