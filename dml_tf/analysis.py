"""How and why DML works (paper Sec. 4.8, 4.9): entropy, flatness, secondary mass, t-SNE.

  python -m dml_tf.analysis --model_dir=runs/dml --compare=runs/independent

Analyses a finished run (a model_dir of an image-classification dataset whose training has
ended) and, to compare, the runs passed with --compare: e.g. an independent run of the same
networks beside a DML run. Each figure shows every run, one colour per run. Per peer:
  * the mean posterior entropy on the training set (paper Sec. 4.8: 1.7099 nats for DML
    against 0.2602 for independent training, ResNet-32 on CIFAR-100);
  * the training loss after Gaussian noise of std σ is added to every trainable weight, for
    a grid of σ, averaged over draws (paper Fig. 4b: a wider minimum loses less);
  * the mean probability of the classes ranked 1..5 by the posterior (paper Fig. 4c);
  * a t-SNE map of the "features" layer on test images, coloured by label (paper Fig. 5).

The training set is read un-augmented and the networks run in inference mode, as for
testing. Each --model_dir run gets `analysis.json` (which checkpoint was analysed, and the
numbers), `analysis_{entropy,noise,top5,tsne}.png` and their captions,
`analysis_captions.md`, in its folder (or in --out_dir/<run name>/). A run still training
is refused unless --allow_unfinished. The functions below take models and arrays, not flags.

Needs the analysis extra (matplotlib, scikit-learn): pip install "dml_tf[analysis]".
"""

import sys

from dml_tf import errors

_MISSING = errors.missing_extra("dml_tf.analysis", "analysis",
                                (("matplotlib", "matplotlib"), ("sklearn", "scikit-learn")))
if _MISSING:
    if __name__ == "__main__":
        print(f"error: {_MISSING}", file=sys.stderr)
        sys.exit(2)
    raise _MISSING

if __name__ == "__main__":  # Before TensorFlow's import: silence its C++ start-up lines.
    from dml_tf import quiet_start
    quiet_start.quiet()

import os
import tempfile
import weakref

import numpy as np
import tensorflow as tf

from dml_tf import checkpoints, paper_numbers, run_dir, train_lib
from dml_tf.report import Progress, describe_position
from dml_tf.data import pipeline
from dml_tf.errors import UserError

DEFAULT_SIGMAS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02)
TOP_K = 5
JSON_NAME = "analysis.json"
CAPTIONS_NAME = "analysis_captions.md"
# Classes coloured and named in the t-SNE (more would be unreadable): tab20 without its two
# greys, which would be mistaken for the grey of the classes left out.
MAX_TSNE_LEGEND = 18
PLOT_NAMES = {"entropy": "analysis_entropy.png", "noise": "analysis_noise.png",
              "top5": "analysis_top5.png", "tsne": "analysis_tsne.png"}


# Quantities (numpy in, numpy out).

def log_softmax(logits):
    """Row-wise log-softmax of float [N, M] logits, in float64 (no underflow to log 0)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def mean_entropy(logits):
    """Mean posterior entropy −Σ_m p^m log p^m (nats) over the rows of [N, M] logits."""
    log_p = log_softmax(logits)
    return float(np.mean(-np.sum(np.exp(log_p) * log_p, axis=-1)))


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy −log p^y of [N, M] logits and int [N] labels."""
    log_p = log_softmax(logits)
    return float(np.mean(-log_p[np.arange(len(labels)), np.asarray(labels)]))


def accuracy(logits, labels):
    """Fraction of rows whose largest logit is the label."""
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def top_k_mass(logits, k=TOP_K):
    """Mean probability of the classes ranked 1..k by each row's posterior (paper Fig. 4c).

    Each row's probabilities are sorted in decreasing order and averaged over the rows, so
    entry 0 is the mean top-1 confidence and entries 1..k−1 the secondary mass DML spreads.

    Returns:
      float [min(k, M)] array, non-increasing.
    """
    probs = np.exp(log_softmax(logits))
    ranked = -np.sort(-probs, axis=-1)[:, :k]
    return ranked.mean(axis=0)


def seeded_subset(n, size, seed):
    """Sorted indices of a seeded random subset of range(n) of `size` (all when size ≤ 0 or ≥ n)."""
    if size <= 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def legend_classes(labels, cap=MAX_TSNE_LEGEND):
    """The classes the t-SNE colours and names: all of them, or the `cap` most frequent.

    Ties in frequency go to the smaller label, so the choice is deterministic.

    Returns:
      Sorted list of labels.
    """
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    order = np.lexsort((values, -counts))[:cap]
    return sorted(values[order].tolist())


def tsne_subset(labels, size, seed, cap=MAX_TSNE_LEGEND):
    """Sorted indices of the test examples for the t-SNE: a seeded subset of `size`.

    With more than `cap` classes it is drawn from the `cap` most frequent ones only
    (`legend_classes`): Market-1501's queries hold a few images of each of 750 identities,
    and a map of 750 colours, or of one point per identity, shows no clusters.
    """
    labels = np.asarray(labels)
    candidates = np.arange(len(labels))
    if len(np.unique(labels)) > cap:
        candidates = np.flatnonzero(np.isin(labels, legend_classes(labels, cap)))
    return candidates[seeded_subset(len(candidates), size, seed)]


# Network passes (inference mode, un-augmented images through the evaluation pipeline).

_INFERENCE_FNS = weakref.WeakKeyDictionary()


def _inference_fn(model, output=None):
    """model (or the model up to layer `output`) in inference mode, compiled once per model:
    the noise curve calls it for every σ and draw, and retracing each time cost seconds."""
    cached = _INFERENCE_FNS.setdefault(model, {})
    if output not in cached:
        cached[output] = _compile_inference(model, output)
    return cached[output]


def _compile_inference(model, output):
    if output is not None:
        import keras  # Only here: the other passes need no sub-model.
        model = keras.Model(model.input, model.get_layer(output).output)
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
    return tf.function(lambda x: tf.cast(model(x, training=False), tf.float32),
                       input_signature=[spec])


def _run(fns, images, mean, std, batch_size):
    """Concatenated outputs of every fn in `fns` over uint8 images, as float64 arrays."""
    labels = np.zeros(len(images), np.int64)  # The pipeline wants labels; they are not used.
    outputs = [[] for _ in fns]
    for x, _ in pipeline.eval_dataset(images, labels, mean, std, batch_size):
        for out, fn in zip(outputs, fns):
            out.append(fn(x).numpy())
    return [np.concatenate(out).astype(np.float64) for out in outputs]


def predict_logits(models, images, mean, std, batch_size=256):
    """Per-model logits on uint8 [N, H, W, 3] images, normalised as in training (list of [N, M])."""
    return _run([_inference_fn(m) for m in models], images, mean, std, batch_size)


def predict_features(model, images, mean, std, batch_size=256, layer="features"):
    """The model's `layer` output (the last pooling, docs/design.md) on uint8 images, [N, D]."""
    return _run([_inference_fn(model, layer)], images, mean, std, batch_size)[0]


def noise_robustness(model, images, labels, mean, std, sigmas=DEFAULT_SIGMAS, draws=3, seed=0,
                     batch_size=256):
    """Training loss after Gaussian noise on every trainable weight (paper Fig. 4b).

    For each σ and draw d: θ' = θ + σ·ε_d, ε_d ~ N(0, I) over every trainable variable
    (kernels, biases, BatchNorm γ/β; the BatchNorm moving statistics are not parameters and
    stay), then the mean cross-entropy on (images, labels) in inference mode. ε_d depends on
    (seed, d) only, so every σ scales the same directions and the curve is smooth in σ.
    σ = 0 is evaluated once, noise-free. The weights are put back exactly (the saved arrays
    are re-assigned) afterwards, also when an error interrupts.

    Args:
      model: a keras.Model mapping normalised images to logits.
      images: uint8 [N, H, W, 3]; labels: int [N].
      mean, std: the per-channel normalisation of the run's data.
      sigmas: the σ grid, each ≥ 0.
      draws: noise draws averaged per σ > 0.
      seed: seed of the draws.
      batch_size: examples per forward pass.

    Returns:
      dict with "sigmas", "loss" (mean over draws per σ), "loss_std" (std over draws) and
      "per_draw" (list per σ of the draws' losses).
    """
    if any(s < 0 for s in sigmas):
        raise UserError(f"--sigmas must be non-negative noise levels, got {list(sigmas)}.")
    if draws < 1:
        raise UserError(f"--draws must be at least 1, got {draws}.")
    fn = _inference_fn(model)
    variables = list(model.trainable_variables)
    saved = [v.numpy() for v in variables]

    def loss():
        return cross_entropy(_run([fn], images, mean, std, batch_size)[0], labels)

    per_draw = []
    try:
        for sigma in sigmas:
            if sigma == 0:
                per_draw.append([loss()])
                continue
            losses = []
            for d in range(draws):
                rng = np.random.default_rng([seed, d])
                for variable, value in zip(variables, saved):
                    noise = rng.standard_normal(value.shape)
                    variable.assign((value + sigma * noise).astype(value.dtype))
                losses.append(loss())
            per_draw.append(losses)
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
    return {"sigmas": [float(s) for s in sigmas],
            "loss": [float(np.mean(l)) for l in per_draw],
            "loss_std": [float(np.std(l)) for l in per_draw],
            "per_draw": per_draw}


def tsne_embedding(features, seed=0, perplexity=30.0):
    """2-d t-SNE (scikit-learn, PCA initialisation, seeded) of [N, D] features.

    The perplexity is capped below N/3 so that small subsets still embed.
    """
    # Imported here: only the t-SNE needs scikit-learn (and threadpoolctl, its dependency).
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
    features = np.asarray(features, np.float64)
    perplexity = float(min(perplexity, max(1.0, (len(features) - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed)
    # One OpenMP thread: Barnes-Hut's threads spin-wait on a busy machine (measured 25 s
    # instead of 0.2 s for 20 points on 2 loaded cores), and one thread is deterministic.
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(features)


# Plots (matplotlib's Figure without pyplot: no global backend or GUI involved). Each
# plot_* function writes its PNG to `path` and returns the Figure, for a caller to inspect.
# One colour per run, the same in every figure; a run's peers differ by hatch or line style.
# Titles say what is drawn; where the paper shows the same (Sec. 4.8, Fig. 4b, 4c, 5) is the
# caption file's business (`captions`), not the figure's.

PLURALS = {"class": "classes", "identity": "identities"}
PEER_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # line and marker per peer
PEER_HATCHES = ("", "//", "..", "xx", "\\\\", "++")
# Headroom above the tallest bar, for its value label.
BAR_HEADROOM = 1.18


def _figure(width=7.0, height=4.5):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def run_label(result):
    """A run's name in legends: with its checkpoint when the run was not finished."""
    checkpoint = result.get("checkpoint") or {}
    if checkpoint and not checkpoint.get("finished", True):
        return f"{result['run']} (unfinished, {checkpoint['name']})"
    return result["run"]


def _series(runs):
    """(run index, peer index, run result, peer name, legend label, peer dict) of every peer."""
    for i, result in enumerate(runs.values()):
        for j, (peer, values) in enumerate(result["peers"].items()):
            yield i, j, result, peer, f"{run_label(result)} · {peer} ({values['net']})", values


def _colour(run):
    from matplotlib import colormaps
    return colormaps["tab10"](run % 10)


def _legend_below(fig, runs):
    """The legend under the axes, where it covers no data: a column per run (filled first)."""
    fig.legend(fontsize=8, loc="outside lower center", ncols=max(1, min(len(runs), 4)))


def paper_entropy(result, net):
    """The paper's training-set entropy for one network of a run, or None (Sec. 4.8).

    Only a run on the paper's own dataset has one: a digits or .npz run is another problem,
    whatever its networks and method.
    """
    return paper_numbers.train_entropy(result.get("dataset"), net, result.get("method"))


def plot_entropy(runs, path):
    """Bar per run and peer of the mean training-set posterior entropy, bars grouped by run.

    The y-axis fits the bars (and the paper's values, drawn as dashed marks on the bars of a
    run on the paper's dataset). log M, the entropy of a uniform posterior, is a dotted line
    where it lies within that range and a note in the corner otherwise.
    """
    series = list(_series(runs))
    fig = _figure(max(6.0, 0.9 * len(series) + 3.0), 4.8)
    ax = fig.subplots()
    where = [i + 0.5 * run for i, (run, *_) in enumerate(series)]  # a gap between runs
    tops, marked = [], False
    for x, (run, peer_index, result, _, label, values) in zip(where, series):
        bars = ax.bar(x, values["entropy"], color=_colour(run), label=label, edgecolor="white",
                      hatch=PEER_HATCHES[peer_index % len(PEER_HATCHES)])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        tops.append(values["entropy"])
        paper = paper_entropy(result, values["net"])
        if paper is not None:
            ax.hlines(paper, x - 0.4, x + 0.4, colors="black", linestyles="--", linewidth=1.5,
                      label=None if marked else "paper's value")
            marked = True
            tops.append(paper)
    top = max([t for t in tops if np.isfinite(t)] or [1.0]) * BAR_HEADROOM
    _mark_uniform(ax, runs, where, series, top)
    ax.set_ylim(0.0, top)
    ax.set_xticks(where, [f"{peer}\n{values['net']}" for *_, peer, _, values in series],
                  fontsize=8)
    centres = [np.mean([x for x, (run, *_) in zip(where, series) if run == r])
               for r in range(len(runs))]
    run_axis = ax.secondary_xaxis("bottom")
    run_axis.set_xticks(centres, [f"\n\n{run_label(r)}" for r in runs.values()], fontsize=9)
    run_axis.tick_params(length=0)
    ax.set_ylabel("mean entropy (nats)")
    ax.set_title("Posterior entropy on the training set", fontsize=10)
    _legend_below(fig, runs)
    fig.savefig(path, dpi=150)
    return fig


def _mark_uniform(ax, runs, where, series, top):
    """log M per run: a dotted line over its bars within the axis, else a note in a corner."""
    beyond = set()
    for x, (run, _, result, *_) in zip(where, series):
        if "num_classes" not in result:
            continue
        uniform = float(np.log(result["num_classes"]))
        if uniform <= top:
            ax.hlines(uniform, x - 0.45, x + 0.45, colors="0.5", linestyles=":")
        else:
            beyond.add(result["num_classes"])
    if beyond:
        ax.text(0.99, 0.98, "uniform posterior: " + ", ".join(
            f"log {m} = {np.log(m):.2f}" for m in sorted(beyond)) + " nats (off the axis)",
            transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.35")


def plot_noise(runs, path):
    """Training loss against the weight-noise std σ, one line per run and peer.

    Left the loss itself, right its increase over the noise-free loss (the width of the
    minimum). The σ axis is linear up to the smallest σ > 0 and logarithmic above (symlog),
    so σ = 0 and the small-noise range are both visible; a σ label that would touch its
    neighbour is left out (its tick stays).
    """
    fig = _figure(10.0, 4.6)
    loss_ax, rise_ax = fig.subplots(1, 2, sharex=True)
    sigmas = sorted({s for r in runs.values() for s in r["noise"]["sigmas"]})
    for run, peer_index, result, _, label, values in _series(runs):
        x, loss = result["noise"]["sigmas"], np.asarray(values["noise_loss"])
        line, marker = PEER_STYLES[peer_index % len(PEER_STYLES)]
        style = dict(color=_colour(run), linestyle=line, marker=marker, markersize=4, capsize=2)
        loss_ax.errorbar(x, loss, yerr=values["noise_loss_std"], label=label, **style)
        clean = loss[x.index(0.0)] if 0.0 in x else np.nan
        rise_ax.errorbar(x, loss - clean, yerr=values["noise_loss_std"], **style)
    positive = [s for s in sigmas if s > 0]
    for ax in (loss_ax, rise_ax):
        if positive:
            ax.set_xscale("symlog", linthresh=min(positive), linscale=0.6)
            ax.set_xlim(-0.2 * min(positive), max(positive) * 1.3)
        ax.set_xticks(sigmas, [f"{s:g}" for s in sigmas], fontsize=8)
        ax.set_xlabel("σ of the Gaussian noise added to every weight")
        ax.grid(alpha=0.3)
    loss_ax.set_ylabel("training cross-entropy")
    rise_ax.set_ylabel("increase over σ = 0")
    fig.suptitle("Training loss under Gaussian noise on the weights", fontsize=10)
    _legend_below(fig, runs)
    _drop_touching_labels(fig, (loss_ax, rise_ax))
    fig.savefig(path, dpi=150)
    return fig


def _drop_touching_labels(fig, axes, gap=4.0):
    """Hides every x tick label closer than `gap` pixels to the last one kept, left to right.

    The figure is laid out first (without rendering), so the measured extents are those the
    saved PNG shows.
    """
    fig.draw_without_rendering()
    for ax in axes:
        kept = None
        for label in sorted(ax.get_xticklabels(), key=lambda t: t.get_window_extent().x0):
            box = label.get_window_extent()
            if kept is not None and box.x0 < kept.x1 + gap:
                label.set_visible(False)
            else:
                kept = box


def plot_top5(runs, path):
    """Mean probability of the top-5 ranked classes, a bar group per rank.

    Logarithmic axis: the secondary classes hold 1–10% of the mass, the first ~90%.
    """
    fig = _figure(7.0, 4.8)
    ax = fig.subplots()
    series = list(_series(runs))
    width = 0.8 / max(1, len(series))
    for i, (run, peer_index, _, _, label, values) in enumerate(series):
        mass = values["top5_mass"]
        ax.bar(np.arange(1, len(mass) + 1) - 0.4 + (i + 0.5) * width, mass, width,
               color=_colour(run), hatch=PEER_HATCHES[peer_index % len(PEER_HATCHES)],
               edgecolor="white", label=label)
    from matplotlib import ticker
    ax.set_yscale("log")
    # Plain numbers at 1, 2, 5 × 10^n: a reader compares 0.05 with 0.01, not exponents.
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(range(1, max(len(v["top5_mass"]) for *_, v in series) + 1))
    ax.set_xlabel("class rank by posterior probability")
    ax.set_ylabel("mean probability on the training set")
    ax.set_title("Posterior mass of the top-ranked classes", fontsize=10)
    _legend_below(fig, runs)
    fig.savefig(path, dpi=150)
    return fig


def plot_tsne(embeddings, labels, path, title="", label_name="class", of_classes=None):
    """One scatter per peer of its 2-d t-SNE points, coloured by label (paper Fig. 5).

    Every class gets a colour and a legend entry; with more than MAX_TSNE_LEGEND classes
    (Market-1501's identities) the most frequent ones do and the rest are small grey points,
    which the figure says.

    Args:
      embeddings: dict peer name -> float [N, 2].
      labels: int [N] class (identity) of every point.
      path: PNG file to write.
      title: figure title (e.g. the run name).
      label_name: what a label is, for the legend ("class", "identity").
      of_classes: how many classes the points were chosen from (`tsne_subset`), when more
        than they show: the title says so.
    """
    from matplotlib import colormaps
    labels = np.asarray(labels)
    shown = legend_classes(labels)
    if len(shown) <= 10:
        colours = colormaps["tab10"].colors
    else:
        colours = [c for c in colormaps["tab20"].colors if len(set(c)) > 1]  # no greys
    fig = _figure(4.2 * len(embeddings) + 1.6, 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(embeddings)))
    other = ~np.isin(labels, shown)
    for ax, (peer, points) in zip(axes, embeddings.items()):
        ax.scatter(points[other, 0], points[other, 1], c="0.8", s=4)
        for j, label in enumerate(shown):
            mine = labels == label
            ax.scatter(points[mine, 0], points[mine, 1], color=colours[j % len(colours)], s=8,
                       label=str(label) if ax is axes[0] else None)
        ax.set_title(peer)
        ax.set_xticks([])
        ax.set_yticks([])
    num_classes = len(np.unique(labels))
    fig.legend(loc="outside right center", fontsize=7, markerscale=1.5,
               title=f"{label_name} (of {num_classes})" if other.any() else label_name)
    if of_classes and of_classes > num_classes:
        title += (f"\nthe {num_classes} {PLURALS[label_name]} with most test images, "
                  f"of {of_classes}")
    if other.any():
        title += (f"\n{len(shown)} most frequent of {num_classes} {PLURALS[label_name]} coloured; "
                  f"the other {int(other.sum())} points grey")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=150)
    return fig


# One run, several runs.

def analyze_cohort(models, data, *, peer_names=None, sigmas=DEFAULT_SIGMAS, draws=3,
                   train_samples=0, noise_samples=1000, tsne_samples=500, seed=0,
                   batch_size=256, progress=None):
    """Every quantity of this module for the models of one cohort on one ImageData.

    Args:
      models: K keras.Models (images -> logits, with a "features" layer for the t-SNE).
      data: the run's ImageData (train and test arrays, normalisation).
      peer_names: K network names for the labels (default the model names).
      sigmas, draws: the noise grid and draws per σ (`noise_robustness`).
      train_samples: training examples for entropy and top-5 mass (≤ 0: all of them).
      noise_samples: training examples, a seeded subset, for the noise curve (≤ 0: all).
      tsne_samples: test examples for the t-SNE (0: no t-SNE).
      seed: seed of the subsets, the noise and the t-SNE.
      batch_size: examples per forward pass.
      progress: called with a line as each stage starts; None: silent.

    Returns:
      A JSON-ready dict: "peers" ({"peer1": {net, entropy, train_ce, train_top1, top5_mass,
      noise_loss, noise_loss_std}, ...}), "noise", "train_examples", "num_classes", and
      "tsne" (with the coordinates) when tsne_samples > 0.
    """
    say = progress or (lambda message: None)
    peer_names = list(peer_names or [m.name for m in models])
    train = seeded_subset(len(data.x_train), train_samples, seed)
    say(f"entropy and top-5 mass: {len(train)} training images through {len(models)} peers")
    x, y = data.x_train[train], data.y_train[train]
    logits = predict_logits(models, x, data.mean, data.std, batch_size)
    noisy = seeded_subset(len(data.x_train), noise_samples, seed + 1)
    result = {"train_examples": int(len(train)), "num_classes": int(data.num_classes),
              "noise": {"sigmas": [float(s) for s in sigmas], "draws": int(draws),
                        "examples": int(len(noisy)), "seed": int(seed)},
              "peers": {}}
    for k, (model, z) in enumerate(zip(models, logits), start=1):
        say(f"peer{k}: noise curve, {len(sigmas)} σ × {draws} draws on {len(noisy)} images")
        noise = noise_robustness(model, data.x_train[noisy], data.y_train[noisy], data.mean,
                                 data.std, sigmas, draws, seed, batch_size)
        result["peers"][f"peer{k}"] = {
            "net": peer_names[k - 1],
            "entropy": mean_entropy(z),
            "train_ce": cross_entropy(z, y),
            "train_top1": accuracy(z, y),
            "top5_mass": [float(v) for v in top_k_mass(z)],
            "noise_loss": noise["loss"],
            "noise_loss_std": noise["loss_std"],
        }
    if tsne_samples > 0:
        test = tsne_subset(data.y_test, tsne_samples, seed + 2)
        points = {}
        for k, model in enumerate(models, start=1):
            say(f"peer{k}: t-SNE of {len(test)} test features")
            points[f"peer{k}"] = tsne_embedding(
                predict_features(model, data.x_test[test], data.mean, data.std, batch_size), seed)
        result["tsne"] = {"examples": int(len(test)), "seed": int(seed),
                          "test_classes": int(len(np.unique(data.y_test))),
                          "labels": data.y_test[test].tolist(),
                          "points": {p: np.round(v, 4).tolist() for p, v in points.items()}}
    return result


def captions(result, compared=()):
    """The figures' captions (markdown): what each shows, on what, and the paper's counterpart.

    Args:
      result: the run's analysis (as written to analysis.json).
      compared: the results of the runs drawn beside it.

    Returns:
      The text of analysis_captions.md.
    """
    runs = [result, *compared]
    noise = result["noise"]
    names = ", ".join(f"{run_label(r)} ({_checkpoint_words(r)})" for r in runs)
    paper = sorted({(r["dataset"], v["net"], r["method"], paper_entropy(r, v["net"]))
                    for r in runs for v in r["peers"].values()
                    if paper_entropy(r, v["net"]) is not None})
    quoted = "".join(f" The dashed marks are the paper's value for {net} on {dataset} with "
                     f"{method}, {value:.4f} nats (Sec. 4.8)." for dataset, net, method, value in paper)
    lines = [
        f"# Analysis of {run_label(result)}",
        "",
        f"Runs: {names}. One colour per run; a run's peers differ by hatch or line style. "
        "Networks in inference mode on un-augmented images.",
        "",
        f"- `{PLOT_NAMES['entropy']}`: mean posterior entropy −Σ p log p (nats) of each peer on "
        f"{result['train_examples']} training images; dotted: log M, a uniform posterior. "
        f"Paper: Sec. 4.8 (ResNet-32 on CIFAR-100: DML 1.7099, independent 0.2602).{quoted}",
        f"- `{PLOT_NAMES['noise']}`: training cross-entropy on {noise['examples']} training "
        f"images after Gaussian noise of std σ is added to every trainable weight, mean ± std "
        f"over {noise['draws']} draws (seed {noise['seed']}); right, the increase over σ = 0: "
        "a wider minimum rises less. Paper: Fig. 4(b).",
        f"- `{PLOT_NAMES['top5']}`: mean probability of the classes ranked 1 to 5 by each "
        "training image's posterior (log scale). Paper: Fig. 4(c).",
    ]
    if "tsne" in result:
        lines.append(f"- `{PLOT_NAMES['tsne']}`: 2-d t-SNE of the \"features\" layer on "
                     f"{result['tsne']['examples']} test images of {run_label(result)}, coloured "
                     "by label. Paper: Fig. 5.")
    return "\n".join(lines) + "\n"


def _checkpoint_words(result):
    checkpoint = result.get("checkpoint")
    if not checkpoint:
        return "checkpoint not recorded"
    return describe_position(checkpoint) + ("" if checkpoint["finished"] else ", unfinished run")


def write_run_outputs(result, folder, compared=()):
    """Writes one run's figures, captions and analysis.json into `folder`.

    Args:
      result: the run's analysis (`analyze_cohort` plus "run", "checkpoint", ...).
      folder: where the files go (the run's folder, or one under --out_dir).
      compared: results of other runs, drawn beside this one in the entropy, noise and top-5
        figures (one colour per run); their numbers are not written here.

    Returns:
      The written files' paths, the JSON last.
    """
    runs = {r["run"]: r for r in (result, *compared)}
    written = []
    for key, plot in (("entropy", plot_entropy), ("noise", plot_noise), ("top5", plot_top5)):
        written.append(os.path.join(folder, PLOT_NAMES[key]))
        plot(runs, written[-1])
    result["plots"] = {k: v for k, v in PLOT_NAMES.items() if k != "tsne"}
    if "tsne" in result:
        tsne = result["tsne"]
        written.append(os.path.join(folder, PLOT_NAMES["tsne"]))
        plot_tsne({p: np.asarray(v) for p, v in tsne["points"].items()}, tsne["labels"],
                  written[-1], f"{run_label(result)}: t-SNE of the test features",
                  label_name="identity" if result.get("dataset") == "market1501" else "class",
                  of_classes=tsne.get("test_classes"))
        result["plots"]["tsne"] = PLOT_NAMES["tsne"]
    result["compared_with"] = [{"run": r["run"], "model_dir": r.get("model_dir")} for r in compared]
    written.append(os.path.join(folder, CAPTIONS_NAME))
    with open(written[-1], "w") as f:
        f.write(captions(result, compared))
    result["captions"] = CAPTIONS_NAME
    written.append(os.path.join(folder, JSON_NAME))
    run_dir.write_json_atomically(written[-1], result)
    return written


def run_names(model_dirs):
    """Legend names: each folder's name, or parent/name where two folders share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in model_dirs]
    return [os.path.join(os.path.basename(os.path.dirname(os.path.normpath(d))), n)
            if names.count(n) > 1 else n for d, n in zip(model_dirs, names)]


# Which checkpoint is analysed, and whether it is the final one.

def is_final_position(config, checkpoint):
    """Whether a checkpoint position is where the run's training ends (its last save).

    The training loop saves its last checkpoint after writing results.json, at the end of the
    last epoch: epoch == --epochs at step 0, or, with a --train_steps budget, the global step
    (the checkpoint's number) at the budget.
    """
    if not checkpoint["closed"]:
        return False
    if config.train_steps:
        return checkpoint["step"] is not None and checkpoint["step"] >= config.train_steps
    return checkpoint["epoch"] >= config.epochs and checkpoint["step_in_epoch"] == 0


def checkpoint_state(model_dir, config, prefix):
    """`checkpoints.position(prefix)` with "finished": the final checkpoint of a run whose
    results.json is written (only then are its numbers the ones results.json reports)."""
    state = checkpoints.position(prefix)
    state["finished"] = bool(is_final_position(config, state)
                             and os.path.isfile(os.path.join(model_dir, "results.json")))
    return state


def _restored_prefix(model_dir, cohort):
    """The checkpoint restore_cohort loaded: the one named after the cohort's restored step
    counter (the training loop saves ckpt-N at N steps), which is not the newest on disk when
    that one is damaged."""
    directory = os.path.join(model_dir, "checkpoints")
    step = cohort.steps_done
    for prefix in checkpoints.prefixes(directory):
        if checkpoints.number(prefix) == step:
            return prefix
    raise RuntimeError(f"{directory} holds no ckpt-{step}, the checkpoint its cohort was "
                       "restored from; the run's checkpoints changed during the analysis.")


def check_finished(model_dir, config, state, allow_unfinished, flag, say):
    """Refuses (or, with allow_unfinished, announces) the analysis of an unfinished run.

    Raises:
      UserError: the run is not finished and allow_unfinished is False.
    """
    if state["finished"]:
        return
    where = describe_position(state)
    if is_final_position(config, state):
        reason = "its results.json is missing (the training command writes it when run again)"
    else:
        reason = "it is still training or was stopped before its last epoch"
        if os.path.isfile(os.path.join(model_dir, "results.json")):
            reason += " (its results.json is from an earlier, shorter training)"
    if not allow_unfinished:
        raise UserError(
            f"{flag}={model_dir} has not finished training: its checkpoint is {where}, and "
            f"{reason}; analyse it once it has finished, or pass --allow_unfinished to analyse "
            "this checkpoint anyway.")
    say(f"warning: {model_dir} has not finished training ({reason}); analysing {where} as "
        "--allow_unfinished asks, and analysis.json and the figures say so")


def _output_folder(model_dir, name, out_dir):
    return os.path.join(out_dir, name) if out_dir else model_dir


def check_writable(folder, what):
    """Refuses, before any computation, an output folder that cannot be written.

    Creates the folder (an --out_dir's) and a file in it, which is removed.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".analysis-write-check-"):
            pass
    except OSError as e:
        raise UserError(f"{folder} cannot be written ({e.strerror or e}), and {what}: make it "
                        "writable, or pass --out_dir=DIR to write the analysis there.") from None


# One run, several runs.

def _analyse_run(model_dir, name, flag, allow_unfinished, tsne, say, options):
    """Restores one run, checks which checkpoint it is, and analyses it (a result dict)."""
    say(f"restoring {model_dir}")
    config = train_lib.load_config(model_dir)
    newest = checkpoints.prefixes(os.path.join(model_dir, "checkpoints"))
    if newest:  # Before the restore and the data load: an unfinished run is refused at once.
        try:
            state = checkpoint_state(model_dir, config, newest[0])
        except Exception:  # noqa: BLE001 (a damaged newest checkpoint: the restore decides)
            state = None
        if state is not None:
            check_finished(model_dir, config, state, allow_unfinished, flag,
                           lambda message: None)
    config, cohort, data = train_lib.restore_cohort(model_dir)
    if data is None:
        raise UserError(f"{flag}={model_dir} is a {config.dataset} run; the analysis "
                        "reads in-memory images (cifar10, cifar100, digits, npz, market1501).")
    state = checkpoint_state(model_dir, config, _restored_prefix(model_dir, cohort))
    check_finished(model_dir, config, state, allow_unfinished, flag, say)
    say(f"analysing {describe_position(state)}")
    result = {"run": name, "model_dir": os.path.abspath(model_dir), "dataset": config.dataset,
              "method": config.method, "nets": list(config.nets), "checkpoint": state}
    result.update(analyze_cohort(cohort.models, data, peer_names=config.nets, progress=say,
                                 **(options if tsne else {**options, "tsne_samples": 0})))
    for peer, values in result["peers"].items():
        say(f"{peer}: entropy {values['entropy']:.4f}, train CE {values['train_ce']:.4f},"
            f" top-5 mass {', '.join(f'{v:.3f}' for v in values['top5_mass'])}")
    return result


def analyze_runs(model_dirs, out_dir=None, progress=None, *, compare=(), allow_unfinished=False,
                 **options):
    """Analyses every run, and writes each one's figures (beside the others) and analysis.json.

    Every figure shows all the runs, `model_dirs` and `compare` alike, one colour per run:
    e.g. a DML run with an independent run of the same networks in `compare`.

    Args:
      model_dirs: finished runs' folders (flags.json, checkpoints/, results.json); each gets
        analysis.json, analysis_captions.md and the figures.
      out_dir: where those go instead of the runs' folders (`out_dir/<run name>/`), e.g. for
        runs that cannot be written.
      progress: called with a line per run and stage, then the written files' paths
        (e.g. `Progress()`, as the command line does); None: silent.
      compare: finished runs' folders drawn beside (analysed the same way, nothing written
        into them).
      allow_unfinished: analyse a run's newest checkpoint although the run has not finished
        (analysis.json and the figures say so); otherwise such a run is refused.
      **options: `analyze_cohort` keyword arguments.

    Returns:
      The list of result dicts, `model_dirs`' then `compare`'s.

    Raises:
      UserError: no run, an output folder that cannot be written, a run that has not
        finished (without allow_unfinished), a run that cannot be analysed.
    """
    if not model_dirs:
        raise UserError("Pass at least one --model_dir (a finished run's folder).")
    say = progress or (lambda message: None)
    dirs = [*model_dirs, *compare]
    names = run_names(dirs)
    flags = ["--model_dir"] * len(model_dirs) + ["--compare"] * len(compare)
    outputs = [_output_folder(d, n, out_dir) for d, n in zip(model_dirs, names)]
    for folder in outputs:  # Before any computation: it is lost if nothing can be written.
        check_writable(folder, "analysis.json and the figures go there")
    results = []
    for i, (model_dir, name, flag) in enumerate(zip(dirs, names, flags), start=1):
        head = f"run {i}/{len(dirs)} {name}"
        results.append(_analyse_run(model_dir, name, flag, allow_unfinished,
                                    tsne=i <= len(model_dirs),
                                    say=lambda message, head=head: say(f"{head}: {message}"),
                                    options=options))
    written = []
    for i, folder in enumerate(outputs):
        say(f"figures of {names[i]}" + (f" beside {', '.join(names[:i] + names[i + 1:])}"
                                        if len(dirs) > 1 else ""))
        written += write_run_outputs(results[i], folder, results[:i] + results[i + 1:])
    say("wrote:")
    for path in written:
        say(f"  {path}")
    return results


def _define_flags(flag_values):
    from absl import flags
    flags.DEFINE_multi_string("model_dir", [], "A finished run's folder: analysed, and its "
                              "analysis.json and figures written into it. Repeat for several "
                              "runs (each one's figures show the others).", flag_values=flag_values)
    flags.DEFINE_list("compare", [], "Finished runs to draw beside the --model_dir runs, "
                      "comma-separated, e.g. the independent run of the same networks beside "
                      "a DML run; analysed the same way, nothing written into them.",
                      flag_values=flag_values)
    flags.DEFINE_string("out_dir", None, "Write each --model_dir run's analysis to "
                        "OUT_DIR/<run name>/ instead of its own folder (e.g. a run you cannot "
                        "write).", flag_values=flag_values)
    flags.DEFINE_bool("allow_unfinished", False, "Analyse a run that has not finished training "
                      "(its newest checkpoint); analysis.json and the figures say so.",
                      flag_values=flag_values)
    flags.DEFINE_list("sigmas", [str(s) for s in DEFAULT_SIGMAS],
                      "Std of the Gaussian weight noise, comma-separated.",
                      flag_values=flag_values)
    flags.DEFINE_integer("draws", 3, "Noise draws averaged per σ.", flag_values=flag_values)
    flags.DEFINE_integer("train_samples", 0, "Training examples for entropy and top-5 mass "
                         "(a seeded subset; 0: all).", flag_values=flag_values)
    flags.DEFINE_integer("noise_samples", 1000, "Training examples for the noise curve (a seeded "
                         "subset; 0: all).", flag_values=flag_values)
    flags.DEFINE_integer("tsne_samples", 500, "Test examples in the t-SNE (0: skip it).",
                         flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed of subsets, noise and t-SNE.", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 256, "Examples per forward pass.", flag_values=flag_values)


def main(argv=None):
    """Command line: parses `argv` (sys.argv by default) and runs; returns the exit status."""
    from absl import flags
    argv = list(sys.argv if argv is None else argv)
    # Own FlagValues: the module defines no global flags, so importing it never clashes with
    # a run script's --model_dir.
    flag_values = flags.FlagValues()
    _define_flags(flag_values)
    if any(a in ("-h", "--help", "-?") for a in argv[1:]):
        print(__doc__ + "\n" + flag_values.get_help())
        return 0
    try:
        rest = flag_values(argv)
        if len(rest) > 1:
            raise UserError(f"Unexpected arguments {' '.join(rest[1:])}; runs go in --model_dir.")
        try:
            sigmas = [float(s) for s in flag_values.sigmas]
        except ValueError:
            raise UserError(f"--sigmas={','.join(flag_values.sigmas)} is not a list of numbers.") from None
        analyze_runs(flag_values.model_dir, flag_values.out_dir, Progress(),
                     compare=flag_values.compare, allow_unfinished=flag_values.allow_unfinished,
                     sigmas=sigmas, draws=flag_values.draws,
                     train_samples=flag_values.train_samples,
                     noise_samples=flag_values.noise_samples,
                     tsne_samples=flag_values.tsne_samples, seed=flag_values.seed,
                     batch_size=flag_values.batch_size)
    except (UserError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
