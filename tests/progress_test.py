"""EpochProgress: plain lines without control characters off a terminal, Keras' Progbar on one,
and the numbers shown are the means it is given."""

import io
import re

import numpy as np
import pytest

from dml_tf import progress

# Every C0 control character but the newline, and DEL: \r, \b, ESC (ANSI codes) among them.
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
VALUE = r"(-?\d+\.\d{4})"


class FakeClock:
    """time.monotonic stand-in that moves only when the test moves it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def _running_means(per_step, step):
    """The epoch's running means after `step` steps, by numpy, keyed as train_lib keys them."""
    return {key: float(np.mean(values[:step])) for key, values in per_step.items()}


def _per_step_values(num_peers, steps, seed=0):
    rng = np.random.default_rng(seed)
    values = {}
    for k in range(1, num_peers + 1):
        values[f"peer{k}/loss"] = rng.uniform(0.5, 3.0, steps)
        values[f"peer{k}/top1"] = rng.uniform(0.0, 1.0, steps)
        values[f"peer{k}/ce"] = rng.uniform(0.5, 3.0, steps)
    return values


def _run_epoch(stream, steps, num_peers=2, every=None, first_step=0, batch_size=8):
    per_step = _per_step_values(num_peers, steps)
    bar = progress.EpochProgress(2, 7, steps, num_peers, batch_size, first_step=first_step,
                                 stream=stream, every=every)
    for step in range(first_step + 1, steps + 1):
        bar.update(step, _running_means(per_step, step))
    final = _running_means(per_step, steps)
    bar.finish(final)
    return final


def test_plain_lines_have_no_control_characters_and_show_the_means():
    stream = io.StringIO()
    final = _run_epoch(stream, steps=10, every=3)
    text = stream.getvalue()
    assert not CONTROL.search(text) and "\x1b" not in text
    lines = text.splitlines()
    assert [re.match(r"Epoch 3/7 step (\d+)/10", line).group(1) for line in lines] == \
        ["3", "6", "9", "10"]
    last = lines[-1]
    for k in (1, 2):
        loss = float(re.search(rf"p{k}_loss: {VALUE}", last).group(1))
        acc = float(re.search(rf"p{k}_acc: {VALUE}", last).group(1))
        assert loss == pytest.approx(final[f"peer{k}/loss"], abs=5e-5)
        assert acc == pytest.approx(final[f"peer{k}/top1"], abs=5e-5)


def test_intermediate_lines_show_the_running_means_of_their_step():
    stream = io.StringIO()
    per_step = _per_step_values(1, 6)
    bar = progress.EpochProgress(0, 1, 6, 1, 4, stream=stream, every=2)
    for step in range(1, 7):
        bar.update(step, _running_means(per_step, step))
    line_of_step_4 = stream.getvalue().splitlines()[1]
    assert "step 4/6" in line_of_step_4
    shown = float(re.search(rf"p1_loss: {VALUE}", line_of_step_4).group(1))
    assert shown == pytest.approx(np.mean(per_step["peer1/loss"][:4]), abs=5e-5)


@pytest.mark.parametrize("steps, lines", [(50, 1), (99, 1), (100, 10), (205, 10)])
def test_default_cadence_is_a_tenth_of_long_epochs_and_only_the_end_of_short_ones(steps, lines):
    stream = io.StringIO()
    _run_epoch(stream, steps=steps, num_peers=1)
    assert len(stream.getvalue().splitlines()) == lines


def test_images_per_second_and_seconds_follow_the_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    stream = io.StringIO()
    bar = progress.EpochProgress(0, 2, 10, 1, 16, first_step=2, stream=stream)
    clock.now += 4.0
    bar.finish({"peer1/loss": 1.0, "peer1/top1": 0.5})
    line = stream.getvalue().splitlines()[-1]
    assert re.search(r" - (\d+\.\d)s - ", line).group(1) == "4.0"
    # Resumed at step 2: 8 steps of 16 images in 4 s.
    assert re.search(r" - (\d+) img/s", line).group(1) == str(8 * 16 // 4)


def test_a_terminal_gets_keras_progbar_showing_the_means_as_given():
    stream = FakeTerminal()
    final = _run_epoch(stream, steps=5)
    text = stream.getvalue()
    assert text.startswith("Epoch 3/7\n")
    assert "\r" in text or "\b" in text  # the bar redraws its line in place
    assert "━" in text or "=" in text  # Progbar's bar
    last = text.rsplit("\r", 1)[-1]
    for k in (1, 2):
        assert f"p{k}_loss: {final[f'peer{k}/loss']:.4f}" in last
        assert f"p{k}_acc: {final[f'peer{k}/top1']:.4f}" in last
    assert text.endswith("\n") and text.count("\n") == 2  # the header and the bar's one line


def test_test_metrics_follow_on_their_own_line():
    stream = io.StringIO()
    bar = progress.EpochProgress(1, 2, 3, 1, 4, stream=stream)
    bar.finish({"peer1/loss": 0.25, "peer1/top1": 0.75}, {"test/peer1/top1": 0.625})
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("Epoch 2/2 step 3/3") and lines[1] == "  test/peer1/top1=0.6250"
