"""The Sec. 4.8 analysis against hand-computed values, and its command line on a trained run."""

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
from matplotlib.colors import to_hex

from dml_tf import analysis, checkpoints, train_lib
from dml_tf import config as config_lib

PNG = b"\x89PNG\r\n\x1a\n"
MEAN, STD = (10.0, 20.0, 30.0), (2.0, 4.0, 5.0)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _dense_model(num_classes=7, seed=0):
    """images [2, 2, 3] -> flatten -> Dense with set weights: logits known in numpy."""
    inputs = keras.Input((2, 2, 3))
    features = keras.layers.Flatten(name="features")(inputs)
    logits = keras.layers.Dense(num_classes, name="logits")(features)
    model = keras.Model(inputs, logits)
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(12, num_classes)), rng.normal(size=num_classes)
    model.get_layer("logits").set_weights([w.astype(np.float32), b.astype(np.float32)])
    return model, w, b


def _images(n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8), rng.integers(0, 7, n)


def _numpy_logits(images, w, b):
    x = (images.astype(np.float64) - np.array(MEAN)) / np.array(STD)
    return x.reshape(len(images), -1) @ w + b


def test_entropy_and_top5_mass_of_known_posteriors():
    probs = np.array([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05],
                      [0.05, 0.05, 0.1, 0.1, 0.2, 0.5]])
    logits = np.log(probs) + 3.0  # A shift changes no posterior.
    entropy = -np.sum(probs[0] * np.log(probs[0]))
    assert analysis.mean_entropy(logits) == pytest.approx(entropy, rel=1e-12)
    np.testing.assert_allclose(analysis.top_k_mass(logits), [0.5, 0.2, 0.1, 0.1, 0.05], rtol=1e-12)
    # Three classes: ranks 1..3 of [.625, .25, .125] and [.5, .25, .25].
    np.testing.assert_allclose(analysis.top_k_mass(logits[:, :3], k=5), [0.5625, 0.25, 0.1875])
    assert analysis.cross_entropy(logits, np.array([0, 5])) == pytest.approx(-np.log(0.5))
    assert analysis.accuracy(logits, np.array([0, 0])) == 0.5
    # Uniform posteriors: the largest entropy, log M.
    assert analysis.mean_entropy(np.zeros((3, 10))) == pytest.approx(np.log(10))


def test_model_quantities_match_numpy():
    model, w, b = _dense_model()
    images, labels = _images(37)
    (logits,) = analysis.predict_logits([model], images, MEAN, STD, batch_size=8)
    expected = _numpy_logits(images, w, b)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    p = _softmax(expected)
    assert analysis.mean_entropy(logits) == pytest.approx(
        np.mean(-np.sum(p * np.log(p), axis=1)), rel=1e-4)
    np.testing.assert_allclose(analysis.top_k_mass(logits), np.mean(-np.sort(-p, axis=1), axis=0)[:5],
                               rtol=1e-4)
    features = analysis.predict_features(model, images, MEAN, STD, batch_size=8)
    np.testing.assert_allclose(features, ((images - np.array(MEAN)) / np.array(STD)).reshape(37, -1),
                               rtol=1e-5, atol=1e-5)


def test_noise_at_sigma_0_is_the_clean_loss_and_weights_come_back_exactly():
    model, w, b = _dense_model()
    images, labels = _images(30)
    before = [v.numpy().copy() for v in model.variables]
    clean = -np.mean(np.log(_softmax(_numpy_logits(images, w, b))[np.arange(30), labels]))
    got = analysis.noise_robustness(model, images, labels, MEAN, STD, sigmas=[0.0, 0.5, 2.0],
                                    draws=2, seed=3, batch_size=16)
    assert got["loss"][0] == pytest.approx(clean, rel=1e-4)
    assert len(got["per_draw"][0]) == 1 and len(got["per_draw"][2]) == 2
    assert got["loss_std"][0] == 0.0 and got["loss"][1] != pytest.approx(clean, rel=1e-3)
    for old, new in zip(before, model.variables):
        np.testing.assert_array_equal(old, new.numpy())
    # The draws depend on the seed only: the same call gives the same curve.
    again = analysis.noise_robustness(model, images, labels, MEAN, STD, sigmas=[0.0, 0.5, 2.0],
                                      draws=2, seed=3, batch_size=16)
    assert again["per_draw"] == got["per_draw"]


def test_noise_perturbs_the_trainable_weights_only():
    """A BatchNorm's moving statistics are not parameters: the noise leaves them alone."""
    inputs = keras.Input((2, 2, 3))
    x = keras.layers.BatchNormalization()(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(7)(x))
    images, labels = _images(12)
    statistics = [v for v in model.non_trainable_variables]
    seen = []
    original = analysis.cross_entropy

    def spy(logits, labels):
        seen.append([v.numpy().copy() for v in statistics])
        return original(logits, labels)

    analysis.cross_entropy = spy
    try:
        analysis.noise_robustness(model, images, labels, MEAN, STD, sigmas=[0.1], draws=1)
    finally:
        analysis.cross_entropy = original
    for value, variable in zip(seen[0], statistics):
        np.testing.assert_array_equal(value, variable.numpy())


def _result(name, sigmas=(0.0, 0.01), dataset="digits", method="dml", net="tiny", entropy=0.3,
            num_classes=10, finished=True):
    peers = {f"peer{k}": {"net": net, "entropy": entropy * k, "train_ce": 0.1, "train_top1": 1.0,
                          "top5_mass": [0.9, 0.05, 0.02, 0.01, 0.005],
                          "noise_loss": [0.1 + 0.2 * k * s for s in sigmas],
                          "noise_loss_std": [0.0] * len(sigmas)}
             for k in (1, 2)}
    checkpoint = {"name": "ckpt-40", "step": 40, "epoch": 2 if finished else 1,
                  "step_in_epoch": 0 if finished else 7, "closed": finished, "finished": finished}
    return {"run": name, "dataset": dataset, "method": method, "peers": peers,
            "num_classes": num_classes, "checkpoint": checkpoint,
            "noise": {"sigmas": list(sigmas), "draws": 3, "examples": 9, "seed": 0},
            "train_examples": 9,
            "tsne": {"examples": 4, "labels": [0, 1, 2, 1],
                     "points": {"peer1": np.eye(4, 2).tolist(), "peer2": np.ones((4, 2)).tolist()}}}


def test_figures_captions_and_json_are_written_with_the_compared_runs(tmp_path):
    compared = _result("ind", method="independent")
    written = analysis.write_run_outputs(_result("dml"), str(tmp_path), [compared])
    assert sorted(os.path.basename(p) for p in written) == sorted(
        ["analysis.json", "analysis_captions.md", "analysis_entropy.png", "analysis_noise.png",
         "analysis_top5.png", "analysis_tsne.png"])
    saved = json.loads(open(written[-1]).read())
    assert set(saved["plots"]) == {"entropy", "noise", "top5", "tsne"}
    for name in saved["plots"].values():
        assert (tmp_path / name).read_bytes().startswith(PNG)
    # Only this run's numbers are in its analysis.json; the compared run is named.
    assert list(saved["peers"]) == ["peer1", "peer2"] and saved["peers"]["peer2"]["entropy"] == 0.6
    assert saved["compared_with"] == [{"run": "ind", "model_dir": None}]
    assert saved["captions"] == "analysis_captions.md"
    # The paper's references live in the captions, not in the figures.
    text = (tmp_path / "analysis_captions.md").read_text()
    for reference in ("Sec. 4.8", "Fig. 4(b)", "Fig. 4(c)", "Fig. 5", "ckpt-40, after epoch 2"):
        assert reference in text, reference
    assert "dml (ckpt-40, after epoch 2), ind (ckpt-40, after epoch 2)" in text


def _legend_texts(fig):
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def _colours(artists):
    return {to_hex(a.get_facecolor()) for a in artists}


def _titles(fig):
    return " ".join([ax.get_title() for ax in fig.axes]
                    + [fig._suptitle.get_text() if fig._suptitle else ""])


def _boxes_overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _legend_clear_of_axes(fig):
    """Whether the figure's legend lies outside every axes' data area (measured as drawn)."""
    fig.draw_without_rendering()
    legend = fig.legends[0].get_window_extent()
    return not any(_boxes_overlap(legend, ax.get_window_extent()) for ax in fig.axes
                   if ax.get_xscale() is not None and ax.patch.get_visible())


def test_paper_entropy_is_marked_only_on_a_run_on_the_papers_dataset(tmp_path):
    digits = {"dml": _result("dml", net="resnet32"),
              "ind": _result("ind", method="independent", net="resnet32")}
    fig = analysis.plot_entropy(digits, str(tmp_path / "digits.png"))
    ax = fig.axes[0]
    assert "paper's value" not in _legend_texts(fig) and not [
        c for c in ax.collections if "--" in str(c.get_linestyle())]
    cifar = {"dml": _result("dml", dataset="cifar100", net="resnet32", num_classes=100),
             "ind": _result("ind", dataset="cifar100", method="independent", net="resnet32",
                            num_classes=100),
             "digits": _result("digits", net="resnet32")}
    fig = analysis.plot_entropy(cifar, str(tmp_path / "cifar.png"))
    ax = fig.axes[0]
    assert "paper" not in _titles(fig) and "Sec." not in _titles(fig)
    # The paper's marks sit on the four CIFAR-100 bars, at its values, and not on the digits'.
    dashed = [c for c in ax.collections if c.get_linestyle()[0][1] is not None]
    marks = np.concatenate([c.get_segments() for c in dashed])
    assert sorted(np.round(marks[:, 0, 1], 4)) == [0.2602, 0.2602, 1.7099, 1.7099]
    centres = [patch.get_x() + patch.get_width() / 2 for patch in ax.patches]
    np.testing.assert_allclose(sorted(marks[:, :, 0].mean(axis=1)), centres[:4])
    # One colour per run (three runs), the peers of a run told apart by their hatch.
    assert len(_colours(ax.patches)) == 3
    assert _colours(ax.patches[:2]) == {to_hex(ax.patches[0].get_facecolor())}
    assert ax.patches[0].get_hatch() != ax.patches[1].get_hatch()
    assert {"dml · peer1 (resnet32)", "digits · peer2 (resnet32)", "paper's value"} <= set(
        _legend_texts(fig))
    assert _legend_clear_of_axes(fig)


def test_entropy_axis_fits_its_bars_and_says_where_log_m_is(tmp_path):
    # Bars of 0.26 and 0.52 nats among 10 classes: log 10 = 2.30 would flatten them.
    runs = {"ind": _result("ind", method="independent", entropy=0.26)}
    ax = analysis.plot_entropy(runs, str(tmp_path / "low.png")).axes[0]
    bottom, top = ax.get_ylim()
    assert bottom == 0.0 and 0.52 < top < 0.52 * 1.3
    assert not [c for c in ax.collections]  # no line drawn at log M
    notes = [t.get_text() for t in ax.texts]
    assert any("log 10 = 2.30" in note for note in notes), notes
    # Bars near log M (a collapsed run): the uniform posterior is a dotted line over them.
    runs = {"collapsed": _result("collapsed", entropy=1.1)}
    ax = analysis.plot_entropy(runs, str(tmp_path / "high.png")).axes[0]
    heights = np.concatenate([c.get_segments() for c in ax.collections])[:, :, 1]
    np.testing.assert_allclose(heights, np.full((2, 2), np.log(10)), rtol=1e-12)  # both bars
    assert ax.get_ylim()[1] >= 2.2 and not [t for t in ax.texts if "log" in t.get_text()]


def _sigma_runs(sigmas):
    return {name: _result(name, sigmas=sigmas) for name in ("dml", "ind")}


def test_noise_plot_shows_sigma_0_and_one_colour_per_run(tmp_path):
    sigmas = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02)
    fig = analysis.plot_noise(_sigma_runs(sigmas), str(tmp_path / "noise.png"))
    loss_ax, rise_ax = fig.axes[:2]
    for ax in (loss_ax, rise_ax):
        assert ax.get_xscale() == "symlog"
        left, right = ax.get_xlim()
        assert left < 0.0 and right > 0.02
        # The small σ are spread out: 0.001 and 0.002 lie far apart on the drawn axis.
        to_axis = ax.transScale.transform
        drawn = [to_axis((s, 1.0))[0] for s in (0.0, 0.001, 0.002, 0.02)]
        assert drawn[2] - drawn[1] > 0.1 * (drawn[3] - drawn[0])
    lines = [c.lines[0] for c in loss_ax.containers]  # each errorbar's data line
    assert len({to_hex(l.get_color()) for l in lines}) == 2  # one colour per run
    assert lines[0].get_linestyle() != lines[1].get_linestyle()  # the peers of a run differ
    assert len(_legend_texts(fig)) == 4 and _legend_clear_of_axes(fig)
    assert "paper" not in _titles(fig) and "Fig." not in _titles(fig)
    # The right panel is the increase over σ = 0: 0.2·k·σ for peer k.
    rises = [np.asarray(c.lines[0].get_ydata(), float) for c in rise_ax.containers]
    np.testing.assert_allclose(rises[1], [0.4 * s for s in sigmas], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rises[2], [0.2 * s for s in sigmas], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sigmas", [(0.0, 0.001, 0.002, 0.005, 0.01, 0.02),
                                    (0.0, 0.001, 0.0012, 0.0015, 0.002, 0.0025, 0.003, 0.1)])
def test_noise_plot_tick_labels_never_touch(tmp_path, sigmas):
    fig = analysis.plot_noise(_sigma_runs(sigmas), str(tmp_path / "noise.png"))
    fig.draw_without_rendering()
    for ax in fig.axes[:2]:
        shown = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        boxes = sorted((t.get_window_extent() for t in shown), key=lambda b: b.x0)
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))
        texts = [t.get_text() for t in shown]
        assert texts[0] == "0" and f"{max(sigmas):g}" in texts
        if len(sigmas) == 6:  # the default grid: every σ is labelled
            assert texts == [f"{s:g}" for s in sigmas]


def test_top5_plot_colours_runs_and_names_no_paper(tmp_path):
    fig = analysis.plot_top5(_sigma_runs((0.0, 0.01)), str(tmp_path / "top5.png"))
    ax = fig.axes[0]
    assert len(_colours(ax.patches)) == 2 and len(ax.patches) == 20
    assert "paper" not in _titles(fig) and "Fig." not in _titles(fig)
    assert _legend_clear_of_axes(fig)


def test_an_unfinished_run_says_so_in_its_legend(tmp_path):
    runs = {"dml": _result("dml", finished=False)}
    fig = analysis.plot_entropy(runs, str(tmp_path / "e.png"))
    assert "dml (unfinished, ckpt-40) · peer1 (tiny)" in _legend_texts(fig)
    text = analysis.captions(runs["dml"])
    assert "ckpt-40, epoch 2 at step 7, unfinished run" in text


def test_tsne_legend_names_every_class_or_the_most_frequent(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    fig = analysis.plot_tsne({"peer1": rng.normal(size=(20, 2)), "peer2": rng.normal(size=(20, 2))},
                             labels, str(tmp_path / "few.png"), "run")
    assert _legend_texts(fig) == ["0", "1", "2", "3"] and fig.legends[0].get_title().get_text() == "class"
    # 30 identities: the 18 most frequent are named (ties to the smaller label), the rest grey.
    many = np.concatenate([np.repeat(np.arange(30), 2), np.arange(10, 28)])  # 10..27 thrice
    assert analysis.MAX_TSNE_LEGEND == 18
    assert analysis.legend_classes(many) == list(range(10, 28))
    assert analysis.legend_classes(many, cap=20) == [0, 1] + list(range(10, 28))
    fig = analysis.plot_tsne({"peer1": rng.normal(size=(len(many), 2))}, many,
                             str(tmp_path / "many.png"), "run", label_name="identity")
    texts = _legend_texts(fig)
    assert len(texts) == 18 and "27" in texts and "28" not in texts and "9" not in texts
    handles = fig.legends[0].legend_handles
    assert len({to_hex(h.get_facecolor()[0]) for h in handles}) == 18
    assert all(len(set(np.round(h.get_facecolor()[0][:3], 3))) > 1 for h in handles)  # no grey
    assert "18 most frequent of 30 identities" in fig._suptitle.get_text()
    assert "other 24 points grey" in fig._suptitle.get_text()


def test_tsne_subset_keeps_to_the_most_frequent_classes_when_there_are_many(tmp_path):
    few = np.repeat(np.arange(5), 8)
    np.testing.assert_array_equal(analysis.tsne_subset(few, 12, seed=3),
                                  analysis.seeded_subset(40, 12, seed=3))
    many = np.concatenate([np.repeat(np.arange(30), 2), np.arange(10, 28)])  # 10..27 thrice
    chosen = analysis.tsne_subset(many, 40, seed=3)
    assert len(chosen) == 40 and len(set(chosen)) == 40 and list(chosen) == sorted(chosen)
    assert set(many[chosen]) <= set(range(10, 28))
    everything = analysis.tsne_subset(many, 0, seed=3)  # all 54 images of those 18 classes
    np.testing.assert_array_equal(everything, np.flatnonzero((many >= 10) & (many < 28)))
    fig = analysis.plot_tsne({"peer1": np.zeros((len(everything), 2))}, many[everything],
                             str(tmp_path / "tsne.png"), "run", label_name="identity",
                             of_classes=30)
    assert "the 18 identities with most test images, of 30" in fig._suptitle.get_text()
    assert "grey" not in fig._suptitle.get_text()


def test_tsne_is_seeded():
    features = np.random.default_rng(0).normal(size=(20, 6))
    a, b = analysis.tsne_embedding(features, seed=1), analysis.tsne_embedding(features, seed=1)
    assert a.shape == (20, 2)
    np.testing.assert_array_equal(a, b)


def test_run_names_and_subsets():
    assert analysis.run_names(["a/dml", "b/ind/"]) == ["dml", "ind"]
    assert analysis.run_names(["a/run", "b/run"]) == ["a/run", "b/run"]
    subset = analysis.seeded_subset(100, 10, seed=4)
    assert len(set(subset)) == 10 and list(subset) == sorted(subset)
    np.testing.assert_array_equal(subset, analysis.seeded_subset(100, 10, seed=4))
    np.testing.assert_array_equal(analysis.seeded_subset(5, 0, seed=4), np.arange(5))


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """Two tiny runs (dml, independent) of 2 steps on an .npz dataset written here."""
    root = tmp_path_factory.mktemp("analysis")
    rng = np.random.default_rng(1)
    path = root / "subset.npz"
    np.savez(path, x_train=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 4, 40).astype(np.uint8),
             x_test=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
             y_test=rng.integers(0, 4, 12).astype(np.uint8))
    base = config_lib.Config(dataset="npz", data_dir=str(path), nets=("tiny", "tiny"),
                             epochs=1, steps_per_epoch=2, batch_size=16, eval_batch_size=16,
                             learning_rate=0.05, export=False)
    dirs = []
    for method in ("dml", "independent"):
        model_dir = root / method
        train_lib.train_and_evaluate(dataclasses.replace(base, method=method,
                                                         model_dir=str(model_dir)))
        dirs.append(model_dir)
    return root, dirs


FAST = ["--sigmas=0,0.01,0.1", "--draws=2", "--noise_samples=16", "--tsne_samples=10"]


def _files(folder):
    return sorted(os.listdir(folder))


def test_command_line_on_a_run_compared_with_another(trained_runs, capsys):
    root, (dml, independent) = trained_runs
    before = _files(independent)
    status = analysis.main(["analysis", f"--model_dir={dml}", f"--compare={independent}", *FAST])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    lines = captured.out.splitlines()
    assert "\r" not in captured.out and "\x1b" not in captured.out  # plain lines for a log file
    assert all(line.startswith("[") and " s] " in line for line in lines)
    for stage in ("run 1/2 dml: restoring", "run 1/2 dml: analysing ckpt-2, after epoch 1",
                  "run 1/2 dml: entropy and top-5 mass",
                  "run 2/2 independent: peer2: noise curve, 3 σ × 2 draws on 16 images",
                  "run 1/2 dml: peer1: t-SNE of 10 test features", "figures of dml beside independent"):
        assert any(stage in line for line in lines), stage
    assert not any("independent: peer1: t-SNE" in line for line in lines)  # only drawn beside
    printed = {line.split("] ", 1)[1].strip() for line in lines}
    assert {str(dml / name) for name in ("analysis.json", "analysis_captions.md",
            "analysis_entropy.png", "analysis_noise.png", "analysis_top5.png",
            "analysis_tsne.png")} <= printed
    assert _files(independent) == before  # nothing written into the compared run
    result = json.loads((dml / "analysis.json").read_text())
    # The checkpoint analysed: the run's last (2 steps, 1 epoch, closed), of a finished run.
    assert result["checkpoint"] == {"name": "ckpt-2", "step": 2, "epoch": 1, "step_in_epoch": 0,
                                    "closed": True, "finished": True}
    assert result["method"] == "dml" and result["train_examples"] == 40
    assert result["num_classes"] == 4 and result["compared_with"] == [
        {"run": "independent", "model_dir": str(independent)}]
    assert result["noise"]["examples"] == 16 and len(result["tsne"]["labels"]) == 10
    for peer in ("peer1", "peer2"):
        values = result["peers"][peer]
        assert 0 < values["entropy"] <= np.log(4) + 1e-9
        assert len(values["top5_mass"]) == 4  # Four classes: ranks 1..4.
        assert len(values["noise_loss"]) == 3
    for name in result["plots"].values():
        assert (dml / name).read_bytes().startswith(PNG)


def _unfinished_copy(root, source, name, position):
    """A copy of a finished run whose newest checkpoint is saved at `position` (epoch,
    step_in_epoch, closed, global step), as the training loop saves a mid-run checkpoint."""
    folder = root / name
    shutil.copytree(source, folder)
    epoch, step_in_epoch, closed, step = position
    _, cohort, _ = train_lib.restore_cohort(str(folder))
    checkpoint = train_lib.make_checkpoint(cohort)
    checkpoint.epoch.assign(epoch)
    checkpoint.step_in_epoch.assign(step_in_epoch)
    checkpoint.closed.assign(closed)
    cohort.step_counter.assign(step)  # what the loop names its checkpoints after
    for optimizer in cohort.optimizers:
        optimizer.iterations.assign(step)
    checkpoints.save(checkpoints.manager(checkpoint, str(folder / "checkpoints")), step)
    return folder


def test_a_run_still_training_is_refused_unless_asked(trained_runs, capsys):
    root, (dml, _) = trained_runs
    training = _unfinished_copy(root, dml, "training", (1, 1, False, 3))
    (training / "results.json").unlink()  # a run in its second epoch has written none yet
    before = _files(training)
    assert analysis.main(["analysis", f"--model_dir={training}", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --model_dir={training} has not finished training: its checkpoint is "
                   "ckpt-3, epoch 2 at step 1, and it is still training or "
                   "was stopped before its last epoch; analyse it once it has finished, or pass "
                   "--allow_unfinished to analyse this checkpoint anyway.")
    assert _files(training) == before
    assert analysis.main(["analysis", f"--model_dir={training}", "--allow_unfinished", *FAST]) == 0
    out = capsys.readouterr().out
    assert "warning: " in out and "analysing ckpt-3, epoch 2 at step 1" in out
    result = json.loads((training / "analysis.json").read_text())
    assert result["checkpoint"] == {"name": "ckpt-3", "step": 3, "epoch": 1, "step_in_epoch": 1,
                                    "closed": False, "finished": False}
    assert "unfinished run" in (training / "analysis_captions.md").read_text()


def test_an_epoch_end_checkpoint_before_the_last_epoch_is_not_final(trained_runs, capsys):
    """The run was extended (--epochs=3 after 1 epoch): its results.json is the old run's."""
    root, (dml, independent) = trained_runs
    extended = _unfinished_copy(root, dml, "extended", (2, 0, True, 4))
    flags = json.loads((extended / "flags.json").read_text())
    (extended / "flags.json").write_text(json.dumps({**flags, "epochs": 3}))
    assert analysis.main(["analysis", f"--model_dir={independent}", f"--compare={extended}",
                          *FAST]) == 2
    err = capsys.readouterr().err
    assert f"--compare={extended} has not finished training: its checkpoint is ckpt-4, after " \
           "epoch 2" in err and "from an earlier, shorter training" in err
    # Its final checkpoint damaged: the restore falls back to ckpt-2, which analysis.json would
    # name, and which is not the final one.
    damaged = _unfinished_copy(root, dml, "damaged", (2, 0, True, 4))
    (damaged / "flags.json").write_text(json.dumps({**flags, "epochs": 2}))
    data = damaged / "checkpoints" / "ckpt-4.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    assert analysis.main(["analysis", f"--model_dir={damaged}", *FAST]) == 2
    assert "its checkpoint is ckpt-2, after epoch 1," in capsys.readouterr().err
    # A finished run without its results.json: its checkpoint is final, the numbers are not.
    nothing = root / "no_results"
    shutil.copytree(dml, nothing)
    (nothing / "results.json").unlink()
    assert analysis.main(["analysis", f"--model_dir={nothing}", *FAST]) == 2
    assert "ckpt-2, after epoch 1, and its results.json is missing" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_written_is_refused_first(trained_runs, capsys,
                                                                   monkeypatch, tmp_path):
    root, (dml, _) = trained_runs
    restored = []
    real_restore = train_lib.restore_cohort
    monkeypatch.setattr(train_lib, "restore_cohort",
                        lambda *a, **k: restored.append(a) or real_restore(*a, **k))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "NamedTemporaryFile", read_only)
        assert analysis.main(["analysis", f"--model_dir={dml}", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {dml} cannot be written (Read-only file system), and analysis.json "
                   "and the figures go there: make it writable, or pass --out_dir=DIR to write "
                   "the analysis there.")
    assert restored == []  # refused before anything was computed
    out = tmp_path / "elsewhere"
    before = _files(dml)
    assert analysis.main(["analysis", f"--model_dir={dml}", f"--out_dir={out}", *FAST]) == 0
    capsys.readouterr()
    assert _files(dml) == before and (out / "dml" / "analysis.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_refused(trained_runs, capsys, tmp_path):
    root, (dml, _) = trained_runs
    locked = tmp_path / "locked"
    shutil.copytree(dml, locked)
    locked.chmod(0o555)
    try:
        assert analysis.main(["analysis", f"--model_dir={locked}", *FAST]) == 2
    finally:
        locked.chmod(0o755)
    assert "cannot be written" in capsys.readouterr().err


def test_command_line_errors_are_one_sentence(trained_runs, capsys):
    root, dirs = trained_runs
    assert analysis.main(["analysis", f"--compare={dirs[0]}"]) == 2
    assert "--model_dir" in capsys.readouterr().err
    assert analysis.main(["analysis", f"--model_dir={root / 'missing'}"]) == 2
    assert "flags.json" in capsys.readouterr().err
    assert analysis.main(["analysis", f"--model_dir={dirs[0]}", "--sigmas=0,x"]) == 2
    assert "--sigmas" in capsys.readouterr().err


_HIDDEN = """
import runpy, sys
sys.modules[sys.argv[1]] = None  # as if the package were not installed
if sys.argv[2] == "import":
    try:
        import dml_tf.analysis
    except ImportError as e:
        print(e)
else:
    sys.argv = ["analysis", "--help"]
    runpy.run_module("dml_tf.analysis", run_name="__main__")
"""


@pytest.mark.parametrize("module,package", [("matplotlib", "matplotlib"),
                                            ("sklearn", "scikit-learn")])
def test_without_the_analysis_extra_it_says_what_to_install(module, package):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    expected = (f"dml_tf.analysis needs the analysis extra ({package} is not installed): "
                'pip install "dml_tf[analysis]"')
    imported = subprocess.run([sys.executable, "-c", _HIDDEN, module, "import"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert imported.stdout.strip() == expected, imported.stderr
    run = subprocess.run([sys.executable, "-c", _HIDDEN, module, "run"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == f"error: {expected}"
    assert "tensorflow" not in run.stderr.lower()  # refused before TensorFlow starts
