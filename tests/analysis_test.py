"""The Sec. 4.8 analysis against hand-computed values, and its command line on a trained run."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
from matplotlib.colors import to_hex

from dml_tf import analysis, train_lib
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


def _result(name, sigmas=(0.0, 0.01), dataset="digits", method="dml", net="tiny"):
    peers = {f"peer{k}": {"net": net, "entropy": 0.3 * k, "train_ce": 0.1, "train_top1": 1.0,
                          "top5_mass": [0.9, 0.05, 0.02, 0.01, 0.005],
                          "noise_loss": [0.1, 0.2 * k], "noise_loss_std": [0.0, 0.01]}
             for k in (1, 2)}
    return {"run": name, "dataset": dataset, "method": method, "peers": peers,
            "noise": {"sigmas": list(sigmas)}, "train_examples": 9,
            "tsne": {"labels": [0, 1, 2, 1], "points": {"peer1": np.eye(4, 2).tolist(),
                                                         "peer2": np.ones((4, 2)).tolist()}}}


def test_plots_and_json_are_written(tmp_path):
    written = analysis.write_run_outputs(_result("dml"), str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == sorted(
        ["analysis.json", "analysis_entropy.png", "analysis_noise.png", "analysis_top5.png",
         "analysis_tsne.png"])
    saved = json.loads(open(written[-1]).read())
    assert set(saved["plots"]) == {"entropy", "noise", "top5", "tsne"}
    for name in saved["plots"].values():
        assert (tmp_path / name).read_bytes().startswith(PNG)
    out = tmp_path / "overlay"
    written = analysis.write_overlays([_result("dml"), _result("ind")], str(out))
    summary = json.loads(open(written[-1]).read())
    assert set(summary) == {"dml", "ind"} and "tsne" not in summary["dml"]
    for name in ("analysis_entropy.png", "analysis_noise.png", "analysis_top5.png"):
        assert str(out / name) in written and (out / name).read_bytes().startswith(PNG)


def _legend_texts(fig):
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def _colours(artists):
    return {to_hex(a.get_facecolor()) for a in artists}


def test_paper_entropy_is_quoted_only_beside_a_run_on_the_papers_dataset(tmp_path):
    digits = {"dml": _result("dml", net="resnet32"),
              "ind": _result("ind", method="independent", net="resnet32")}
    fig = analysis.plot_entropy(digits, str(tmp_path / "digits.png"))
    (ax,) = fig.axes
    assert "paper" not in ax.get_title() and not ax.collections  # no paper marks
    assert "1.7099" not in ax.get_title() and "0.26" not in ax.get_title()
    npz = {"dml": _result("dml", dataset="npz", net="resnet32")}
    assert "paper" not in analysis.plot_entropy(npz, str(tmp_path / "npz.png")).axes[0].get_title()
    cifar = {"dml": _result("dml", dataset="cifar100", net="resnet32"),
             "ind": _result("ind", dataset="cifar100", method="independent", net="resnet32"),
             "digits": _result("digits", net="resnet32")}
    ax = analysis.plot_entropy(cifar, str(tmp_path / "cifar.png")).axes[0]
    assert "dml 1.7099" in ax.get_title() and "independent 0.2602" in ax.get_title()
    # The paper's mark sits on the four CIFAR-100 bars, at its values, and not on the digits'.
    marks = np.concatenate([c.get_segments() for c in ax.collections])
    assert sorted(np.round(marks[:, 0, 1], 4)) == [0.2602, 0.2602, 1.7099, 1.7099]
    centres = [patch.get_x() + patch.get_width() / 2 for patch in ax.patches]
    np.testing.assert_allclose(sorted(marks[:, :, 0].mean(axis=1)), centres[:4])  # not the digits
    # One colour per run and peer, each in the legend.
    assert len(_colours(ax.patches)) == 6
    assert {"dml · peer1 (resnet32)", "digits · peer2 (resnet32)", "paper, Sec. 4.8"} <= set(
        _legend_texts(ax.figure))


def test_noise_plot_shows_sigma_0_and_one_colour_per_run_and_peer(tmp_path):
    sigmas = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02)
    runs = {}
    for name in ("dml", "ind"):
        runs[name] = _result(name, sigmas=sigmas)
        for k, peer in enumerate(runs[name]["peers"].values(), start=1):
            peer["noise_loss"] = [0.1 + k * s for s in sigmas]
            peer["noise_loss_std"] = [0.0] * len(sigmas)
    fig = analysis.plot_noise(runs, str(tmp_path / "noise.png"))
    loss_ax, rise_ax = fig.axes
    for ax in fig.axes:
        assert ax.get_xscale() == "symlog"
        left, right = ax.get_xlim()
        assert left < 0.0 and right > 0.02
        # The small σ are spread out: 0.001 and 0.002 lie far apart on the drawn axis.
        to_axis = ax.transScale.transform
        drawn = [to_axis((s, 1.0))[0] for s in (0.0, 0.001, 0.002, 0.02)]
        assert drawn[2] - drawn[1] > 0.1 * (drawn[3] - drawn[0])
    lines = [c.lines[0] for c in loss_ax.containers]  # each errorbar's data line
    assert len({to_hex(l.get_color()) for l in lines}) == 4
    assert len(_legend_texts(fig)) == 4
    # The right panel is the increase over σ = 0: k·σ for peer k.
    rises = [np.asarray(c.lines[0].get_ydata(), float) for c in rise_ax.containers]
    np.testing.assert_allclose(rises[1], [2 * s for s in sigmas], atol=1e-12)
    np.testing.assert_allclose(rises[2], sigmas, atol=1e-12)


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


def test_command_line_on_trained_runs(trained_runs, capsys):
    root, dirs = trained_runs
    out = root / "compare"
    status = analysis.main(["analysis", *(f"--model_dir={d}" for d in dirs), f"--out_dir={out}",
                            "--sigmas=0,0.01,0.1", "--draws=2", "--noise_samples=16",
                            "--tsne_samples=10"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    lines = captured.out.splitlines()
    assert "\r" not in captured.out and "\x1b" not in captured.out  # plain lines for a log file
    assert all(line.startswith("[") and " s] " in line for line in lines)
    for stage in ("run 1/2 dml: restoring", "run 1/2 dml: entropy and top-5 mass",
                  "run 2/2 independent: peer2: noise curve, 3 σ × 2 draws on 16 images",
                  "run 2/2 independent: peer1: t-SNE of 10 test features", "overlays of 2 runs"):
        assert any(stage in line for line in lines), stage
    printed = {line.split("] ", 1)[1].strip() for line in lines}
    expected = {str(d / name) for d in dirs for name in (
        "analysis.json", "analysis_entropy.png", "analysis_noise.png", "analysis_top5.png",
        "analysis_tsne.png")} | {str(out / name) for name in (
        "analysis.json", "analysis_entropy.png", "analysis_noise.png", "analysis_top5.png")}
    assert expected <= printed
    for model_dir in dirs:
        result = json.loads((model_dir / "analysis.json").read_text())
        assert result["method"] == model_dir.name and result["train_examples"] == 40
        assert result["num_classes"] == 4
        assert result["noise"]["examples"] == 16 and len(result["tsne"]["labels"]) == 10
        for peer in ("peer1", "peer2"):
            values = result["peers"][peer]
            assert 0 < values["entropy"] <= np.log(4) + 1e-9
            assert len(values["top5_mass"]) == 4  # Four classes: ranks 1..4.
            assert len(values["noise_loss"]) == 3
        for name in result["plots"].values():
            assert (model_dir / name).read_bytes().startswith(PNG)
    assert set(json.loads((out / "analysis.json").read_text())) == {"dml", "independent"}
    assert (out / "analysis_noise.png").read_bytes().startswith(PNG)


def test_command_line_errors_are_one_sentence(trained_runs, capsys):
    root, dirs = trained_runs
    assert analysis.main(["analysis", *(f"--model_dir={d}" for d in dirs)]) == 2
    assert "--out_dir" in capsys.readouterr().err
    assert analysis.main(["analysis", f"--model_dir={root / 'missing'}"]) == 2
    assert "flags.json" in capsys.readouterr().err
    assert analysis.main(["analysis", f"--model_dir={dirs[0]}", "--sigmas=0,x"]) == 2
    assert "--sigmas" in capsys.readouterr().err
