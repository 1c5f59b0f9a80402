"""How and why DML works (paper Sec. 4.8, 4.9): entropy, flatness, secondary mass, t-SNE.

  python -m dml_tf.analysis --model_dir=runs/dml [--model_dir=runs/independent --out_dir=cmp]

For every run (a finished model_dir of an image-classification dataset) and every peer:
  * the mean posterior entropy on the training set (paper: 1.7099 nats for DML against
    0.2602 for independent training, ResNet-32 on CIFAR-100);
  * the training loss after Gaussian noise of std σ is added to every trainable weight, for
    a grid of σ, averaged over draws (paper Fig. 4b: a wider minimum loses less);
  * the mean probability of the classes ranked 1..5 by the posterior (paper Fig. 4c);
  * a t-SNE map of the "features" layer on test images, coloured by label (paper Fig. 5).

The training set is read un-augmented and the networks run in inference mode, as for
testing. Each run gets `analysis.json` and `analysis_{entropy,noise,top5,tsne}.png` in its
folder; with several runs, --out_dir receives the plots that overlay them and an
`analysis.json` of all. The functions below take models and arrays, not flags.
"""

import os
import sys
import weakref

import numpy as np
import tensorflow as tf

from dml_tf import train_lib
from dml_tf.data import pipeline
from dml_tf.errors import UserError

DEFAULT_SIGMAS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02)
TOP_K = 5
JSON_NAME = "analysis.json"
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
    """The model's `layer` output (the last pooling, DESIGN.md) on uint8 images, [N, D]."""
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


# Plots (matplotlib's Figure without pyplot: no global backend or GUI involved).

def _figure(width=7.0, height=4.5):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _series(runs):
    """(run name, peer name, label for the legend, peer dict) for every run and peer."""
    for name, result in runs.items():
        for peer, values in result["peers"].items():
            yield name, peer, f"{name} · {peer} ({values['net']})", values


def _colour(i):
    from matplotlib import colormaps
    return colormaps["tab10"](i % 10)


def plot_entropy(runs, path):
    """Bar per run and peer of the mean training-set posterior entropy (paper Sec. 4.8)."""
    fig = _figure()
    ax = fig.subplots()
    series = list(_series(runs))
    run_index = {name: i for i, name in enumerate(runs)}
    for i, (name, _, label, values) in enumerate(series):
        bars = ax.bar(i, values["entropy"], color=_colour(run_index[name]), label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(series)), [f"{n}\n{p} ({v['net']})" for n, p, _, v in series],
                  fontsize=8)
    ax.set_ylabel("mean posterior entropy on the training set (nats)")
    ax.set_title("Posterior entropy (paper, ResNet-32 CIFAR-100: DML 1.71, independent 0.26)",
                 fontsize=10)
    fig.savefig(path, dpi=120)


def plot_noise(runs, path):
    """Training loss against the weight-noise std σ, one line per run and peer (paper Fig. 4b)."""
    fig = _figure()
    ax = fig.subplots()
    styles = ("-", "--", ":", "-.")
    run_index = {name: i for i, name in enumerate(runs)}
    for name, peer, label, values in _series(runs):
        k = list(runs[name]["peers"]).index(peer)
        ax.errorbar(runs[name]["noise"]["sigmas"], values["noise_loss"],
                    yerr=values["noise_loss_std"], color=_colour(run_index[name]),
                    linestyle=styles[k % len(styles)], marker="o", markersize=3, capsize=2,
                    label=label)
    ax.set_xlabel("σ of the Gaussian noise added to every weight")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("Loss change given parameter noise (paper Fig. 4b)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_top5(runs, path):
    """Mean probability of the top-5 ranked classes, a bar group per rank (paper Fig. 4c).

    Logarithmic axis: the secondary classes hold 1–10% of the mass, the first ~90%.
    """
    fig = _figure()
    ax = fig.subplots()
    series = list(_series(runs))
    run_index = {name: i for i, name in enumerate(runs)}
    width = 0.8 / max(1, len(series))
    hatches = ("", "//", "..", "xx")
    for i, (name, peer, label, values) in enumerate(series):
        mass = values["top5_mass"]
        k = list(runs[name]["peers"]).index(peer)
        ax.bar(np.arange(1, len(mass) + 1) - 0.4 + (i + 0.5) * width, mass, width,
               color=_colour(run_index[name]), hatch=hatches[k % len(hatches)],
               edgecolor="white", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("class rank by posterior probability")
    ax.set_ylabel("mean probability on the training set")
    ax.set_title("Posterior certainty (paper Fig. 4c)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_tsne(embeddings, labels, path, title=""):
    """One scatter per peer of its 2-d t-SNE points, coloured by label (paper Fig. 5).

    Args:
      embeddings: dict peer name -> float [N, 2].
      labels: int [N] class (identity) of every point.
      path: PNG file to write.
      title: figure title (e.g. the run name).
    """
    from matplotlib import colormaps
    fig = _figure(4.5 * len(embeddings), 4.5)
    axes = np.atleast_1d(fig.subplots(1, len(embeddings)))
    labels = np.asarray(labels)
    cmap = colormaps["tab10" if labels.max(initial=0) < 10 else "tab20"]
    for ax, (peer, points) in zip(axes, embeddings.items()):
        ax.scatter(points[:, 0], points[:, 1], c=cmap(labels % cmap.N), s=6)
        ax.set_title(peer)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


# One run, several runs.

def analyze_cohort(models, data, *, peer_names=None, sigmas=DEFAULT_SIGMAS, draws=3,
                   train_samples=0, noise_samples=1000, tsne_samples=500, seed=0,
                   batch_size=256):
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

    Returns:
      A JSON-ready dict: "peers" ({"peer1": {net, entropy, train_ce, train_top1, top5_mass,
      noise_loss, noise_loss_std}, ...}), "noise", "train_examples", and "tsne" (with the
      coordinates) when tsne_samples > 0.
    """
    peer_names = list(peer_names or [m.name for m in models])
    train = seeded_subset(len(data.x_train), train_samples, seed)
    x, y = data.x_train[train], data.y_train[train]
    logits = predict_logits(models, x, data.mean, data.std, batch_size)
    noisy = seeded_subset(len(data.x_train), noise_samples, seed + 1)
    result = {"train_examples": int(len(train)),
              "noise": {"sigmas": [float(s) for s in sigmas], "draws": int(draws),
                        "examples": int(len(noisy)), "seed": int(seed)},
              "peers": {}}
    for k, (model, z) in enumerate(zip(models, logits), start=1):
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
        test = seeded_subset(len(data.x_test), tsne_samples, seed + 2)
        points = {f"peer{k}": tsne_embedding(predict_features(m, data.x_test[test], data.mean,
                                                              data.std, batch_size), seed)
                  for k, m in enumerate(models, start=1)}
        result["tsne"] = {"examples": int(len(test)), "seed": int(seed),
                          "labels": data.y_test[test].tolist(),
                          "points": {p: np.round(v, 4).tolist() for p, v in points.items()}}
    return result


def write_run_outputs(result, folder):
    """Writes one run's analysis.json and its four PNGs into `folder`; returns the JSON path."""
    runs = {result["run"]: result}
    plot_entropy(runs, os.path.join(folder, PLOT_NAMES["entropy"]))
    plot_noise(runs, os.path.join(folder, PLOT_NAMES["noise"]))
    plot_top5(runs, os.path.join(folder, PLOT_NAMES["top5"]))
    result["plots"] = {k: v for k, v in PLOT_NAMES.items() if k != "tsne"}
    if "tsne" in result:
        tsne = result["tsne"]
        plot_tsne({p: np.asarray(v) for p, v in tsne["points"].items()}, tsne["labels"],
                  os.path.join(folder, PLOT_NAMES["tsne"]),
                  f"{result['run']}: t-SNE of the test features")
        result["plots"]["tsne"] = PLOT_NAMES["tsne"]
    path = os.path.join(folder, JSON_NAME)
    train_lib.write_json_atomically(path, result)
    return path


def write_overlays(results, out_dir):
    """The entropy, noise and top-5 plots of several runs overlaid, and their JSON, in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    runs = {r["run"]: r for r in results}
    for key, plot in (("entropy", plot_entropy), ("noise", plot_noise), ("top5", plot_top5)):
        plot(runs, os.path.join(out_dir, PLOT_NAMES[key]))
    summary = {name: {k: v for k, v in r.items() if k != "tsne"} for name, r in runs.items()}
    path = os.path.join(out_dir, JSON_NAME)
    train_lib.write_json_atomically(path, summary)
    return path


def run_names(model_dirs):
    """Legend names: each folder's name, or parent/name where two folders share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in model_dirs]
    return [os.path.join(os.path.basename(os.path.dirname(os.path.normpath(d))), n)
            if names.count(n) > 1 else n for d, n in zip(model_dirs, names)]


def analyze_runs(model_dirs, out_dir=None, **options):
    """Analyses every run (results in its folder), then overlays them in out_dir.

    Args:
      model_dirs: finished runs' folders (flags.json, checkpoints/).
      out_dir: where the plots overlaying several runs go; required with more than one run.
      **options: `analyze_cohort` keyword arguments.

    Returns:
      The list of per-run result dicts.
    """
    if not model_dirs:
        raise UserError("Pass at least one --model_dir (a finished run's folder).")
    if len(model_dirs) > 1 and not out_dir:
        raise UserError("With several --model_dir, pass --out_dir for the plots that overlay them.")
    results = []
    for model_dir, name in zip(model_dirs, run_names(model_dirs)):
        config, cohort, data = train_lib.restore_cohort(model_dir)
        if data is None:
            raise UserError(f"--model_dir={model_dir} is a {config.dataset} run; the analysis "
                            "reads in-memory images (cifar10, cifar100, digits, npz, market1501).")
        print(f"Analysing {model_dir} ({config.method}, {','.join(config.nets)}) ...")
        result = {"run": name, "model_dir": os.path.abspath(model_dir),
                  "dataset": config.dataset, "method": config.method, "nets": list(config.nets)}
        result.update(analyze_cohort(cohort.models, data, peer_names=config.nets, **options))
        print(f"  {write_run_outputs(result, model_dir)}")
        for peer, values in result["peers"].items():
            print(f"  {peer}: entropy {values['entropy']:.4f}, train CE {values['train_ce']:.4f}, "
                  f"top-5 mass {', '.join(f'{v:.3f}' for v in values['top5_mass'])}")
        results.append(result)
    if out_dir:
        print(f"  {write_overlays(results, out_dir)}")
    return results


def _define_flags(flag_values):
    from absl import flags
    flags.DEFINE_multi_string("model_dir", [], "A finished run's folder; repeat to overlay runs.",
                              flag_values=flag_values)
    flags.DEFINE_string("out_dir", None, "Folder for the plots overlaying several runs and their "
                        "analysis.json (each run's own go to its folder).", flag_values=flag_values)
    flags.DEFINE_list("sigmas", [str(s) for s in DEFAULT_SIGMAS],
                      "Std of the Gaussian weight noise, comma-separated (paper Fig. 4b).",
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
        analyze_runs(flag_values.model_dir, flag_values.out_dir, sigmas=sigmas,
                     draws=flag_values.draws, train_samples=flag_values.train_samples,
                     noise_samples=flag_values.noise_samples,
                     tsne_samples=flag_values.tsne_samples, seed=flag_values.seed,
                     batch_size=flag_values.batch_size)
    except (UserError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
