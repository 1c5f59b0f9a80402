"""Real CIFAR-10 images on a CPU: methods side by side on one cohort, same budget.

Default: a ResNet-32 pair with `dml` vs `independent`; `--methods` and `--nets` choose others
(KDCL methods run with per-peer augmentation).

Trains on a real CIFAR-10 subset of 4,000 training and 1,000 test images, an .npz file
with uint8 `x_train` [N, 32, 32, 3], `y_train`, `x_test`, `y_test` (ours,
`cifar10_subset_train4000_test1000.npz`: the first 4,000 images of CIFAR-10's
`data_batch_1` and the first 1,000 of its `test_batch`, lossless), and
prints, per method, each peer's and the ensemble's test top-1, the peers' test agreement
(fraction of test images on which they predict the same class), each peer's training top-1
in the last epoch and its mean posterior entropy on the training set (paper Sec. 4.8: DML's
is higher).

  .venv/bin/python bench/cifar10_subset.py --npz=PATH [--epochs=12] [--seeds=0,1,2]

--npz is required unless the environment variable DML_TF_CIFAR10_SUBSET holds the path.

Protocols (each the same for every method, never tuned per method): SGD Nesterov 0.9,
batch 64, weight decay 5e-4, sequential updates, lr 0.1 with a 2-epoch linear warm-up, ×0.1
every round(--decay_at × --epochs) epochs (staircase).
- Short (the defaults, the README's seeded table): 12 epochs, ×0.1 after epoch 9.
- To convergence: `--epochs=150 --decay_at=0.4`, the paper's CIFAR schedule itself (×0.1
  every 60 epochs) cut at epoch 150 instead of 200: lr 0.1 to epoch 60, 0.01 to 120, 0.001
  to 150. 80 epochs with the staircase scaled (`--decay_at=0.3`, drops every 24) left the
  independent peers at 96 % training top-1; `bench/diagnostics.py` reports the epoch from
  which each run's peers stay at or above 99 %.
- Heterogeneous: the same with `--nets=mobilenet,resnet32` (peer 1 MobileNet, peer 2
  ResNet-32; paper Table 2's pair), in its own --out_dir.

One folder per method and seed, `<method>_seed<s>/` under --out_dir (TensorBoard events,
checkpoints, results.json; `bench/plot_curves.py` and `bench/diagnostics.py` read them). Run
the same command again: a finished run is restored, not retrained, and an unfinished one
(stopped, or cut short with the session) resumes from its last checkpoint. Its minutes, in
`bench_seconds.json`, add up over the sessions that trained it (a process killed outright,
SIGKILL, loses the minutes of its last session). With --archive_dir, each finished run is
also copied there without its checkpoints (a few hundred KB), and a run found there is read
back, not trained: committed to the repository, such an archive carries finished runs to
the next session or machine.
"""

import glob
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml_tf import quiet_start  # noqa: E402

quiet_start.quiet()  # TensorFlow's start-up lines would open the bench's log, as in the run scripts

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from dml_tf import config as config_lib  # noqa: E402
from dml_tf import data as data_lib  # noqa: E402
from dml_tf import tasks  # noqa: E402
from dml_tf import losses, run_dir, train_lib  # noqa: E402
from dml_tf.data import pipeline  # noqa: E402
from dml_tf.errors import UserError  # noqa: E402

NPZ_VARIABLE = "DML_TF_CIFAR10_SUBSET"  # the --npz default, for machines that keep the file
flags.DEFINE_string("npz", os.environ.get(NPZ_VARIABLE), "The CIFAR-10 subset .npz (x_train, "
                    f"y_train, x_test, y_test); default: ${NPZ_VARIABLE}.")
flags.DEFINE_integer("epochs", 12, "Epochs per method.")
flags.DEFINE_float("learning_rate", 0.1, "Initial SGD (Nesterov 0.9) learning rate, the paper's "
                   "(with --warmup_epochs=0 its first steps blow up and a DML pair can collapse "
                   "to uniform predictions; earlier tables here used 0.02).")
flags.DEFINE_float("decay_at", 0.75, "lr drops x0.1 every round(decay_at x --epochs) epochs "
                   "(staircase): 0.75 drops once, after 3/4 of the epochs; 0.3 is the paper's "
                   "CIFAR schedule (every 60 of 200 epochs) scaled to --epochs.")
flags.DEFINE_list("methods", ["independent", "dml"], "Methods to compare.")
flags.DEFINE_list("precisions", ["float32"], "--precision of each run (every method is run "
                  "in each), e.g. float32,mixed_bfloat16.")
flags.DEFINE_string("nets", "resnet32,resnet32", "The cohort.")
flags.DEFINE_string("update", "sequential", "Update order.")
flags.DEFINE_string("out_dir", "/tmp/dml_tf_bench_cifar10_subset", "Where the runs go.")
flags.DEFINE_list("seeds", ["0"], "Seeds: every method runs once per seed (the same seeds for "
                  "every method, so seed s of dml and of independent share initialisation and "
                  "data order); with several, the table gives mean ± std and the paired "
                  "differences of the methods against the first one.")
flags.DEFINE_float("warmup_epochs", 2.0, "Linear learning-rate warm-up (--warmup_epochs of the "
                   "run scripts; 0: off, as in the paper; the default 2 is a deviation that lets "
                   "lr 0.1 train stably on this budget).")
flags.DEFINE_string("archive_dir", None, "Where each finished run is also kept without its "
                    "checkpoints (flags.json, results.json, TensorBoard events, minutes, "
                    "training-set entropy): a run archived there is read back instead of "
                    "trained, so runs can be committed and spread over machines; the "
                    "diagnostics and plots read it as their --runs_dir.")
flags.DEFINE_string("teacher_checkpoint", None, "kd: the teacher run (its peer 1 is the teacher).")
FLAGS = flags.FLAGS


def load_subset(path):
    with np.load(path) as f:
        x_train, x_test = f["x_train"], f["x_test"]
        y_train, y_test = f["y_train"].astype(np.int64), f["y_test"].astype(np.int64)
    mean, std = data_lib.channel_stats(x_train)
    return data_lib.ImageData(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                              num_classes=10, mean=mean, std=std, name="cifar10_subset")


def train_entropy(cohort, data):
    """Mean posterior entropy (nats) of each peer over the un-augmented training set."""
    ds = pipeline.eval_dataset(data.x_train, data.y_train, data.mean, data.std, 500)
    totals = np.zeros(cohort.num_peers)
    for images, _ in ds:
        for k, logits in enumerate(cohort.predict_logits(images)):
            totals[k] += float(losses.entropy(logits)) * int(images.shape[0])
    return totals / len(data.x_train)


def run_one(data, method, precision, seed):
    """Trains (resumes, or where its model_dir holds the finished run, restores) one run, or
    reads it from --archive_dir.

    Returns:
      (results dict, the peers' training-set entropies, seconds trained or None if unknown).
    """
    name = f"{method}_{precision}_seed{seed}" if precision != "float32" else f"{method}_seed{seed}"
    cfg = config_lib.Config(
        # dataset "npz" at the file: `python -m dml_tf.analysis` can restore these runs.
        dataset="npz", data_dir=os.path.abspath(FLAGS.npz), nets=config_lib.parse_nets(FLAGS.nets),
        method=method, update=FLAGS.update, epochs=FLAGS.epochs, batch_size=64,
        learning_rate=FLAGS.learning_rate, lr_decay_rate=0.1,
        lr_decay_epochs=max(1, round(FLAGS.decay_at * FLAGS.epochs)),
        warmup_epochs=FLAGS.warmup_epochs, weight_decay=5e-4, seed=seed, eval_every_epochs=1,
        export=False,
        # KDCL's second ingredient: each peer sees its own augmentation of the batch.
        per_peer_augmentation=method.startswith("kdcl"),
        teacher_checkpoint=FLAGS.teacher_checkpoint if method == "kd" else None,
        precision=precision,
        model_dir=os.path.join(FLAGS.out_dir, name))
    archive = os.path.join(FLAGS.archive_dir, name) if FLAGS.archive_dir else None
    if archive and os.path.exists(archive):
        return load_archived(archive, cfg)
    cohort, results, seconds = _train_timed(cfg, tasks.ClassificationTask(data))
    entropy = train_entropy(cohort, data)
    if archive:
        archive_run(cfg.model_dir, archive, entropy)
    return results, entropy, seconds


ARCHIVED_FILES = ("flags.json", "results.json", "bench_seconds.json", "events.out.tfevents.*")
ENTROPY_FILE = "bench_entropy.json"


def archive_run(model_dir, archive, entropy):
    """Copies a finished run's small files (ARCHIVED_FILES, not its checkpoints or export)
    and its training-set entropies into `archive`, replacing what was there."""
    staging = archive.rstrip(os.sep) + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for pattern in ARCHIVED_FILES:
        for path in glob.glob(os.path.join(model_dir, pattern)):
            shutil.copy2(path, staging)
    # The archive travels (committed, read on other machines): no paths of this machine.
    with open(os.path.join(staging, "flags.json")) as f:
        settings = json.load(f)
    for key in ("data_dir", "model_dir"):
        settings[key] = os.path.basename(os.path.normpath(settings[key] or "")) or None
    run_dir.write_json_atomically(os.path.join(staging, "flags.json"), settings)
    run_dir.write_json_atomically(os.path.join(staging, ENTROPY_FILE),
                                  {"train_entropy": [float(e) for e in entropy]})
    shutil.rmtree(archive, ignore_errors=True)
    os.replace(staging, archive)


def load_archived(archive, cfg):
    """(results, entropies, seconds or None) of an archived run trained with cfg's settings."""
    try:
        with open(os.path.join(archive, "flags.json")) as f:
            archived = json.load(f)
        with open(os.path.join(archive, "results.json")) as f:
            results = json.load(f)
        with open(os.path.join(archive, ENTROPY_FILE)) as f:
            entropy = np.asarray(json.load(f)["train_entropy"], float)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--archive_dir: {archive} is not a whole archived run ({e}); delete "
                        "it to train the run again.") from None
    current = json.loads(cfg.to_json())
    changed = run_dir.changed_settings(archived, current)
    changed += ["epochs"] if archived.get("epochs") != cfg.epochs else []
    if changed:
        raise UserError(f"--archive_dir: {archive} was trained with other {', '.join(changed)} "
                        "than these flags ask for; pass another --archive_dir for this protocol.")
    try:
        with open(os.path.join(archive, "bench_seconds.json")) as f:
            seconds = float(json.load(f)["seconds"])
    except (OSError, ValueError, KeyError):
        seconds = None
    return results, entropy, seconds


def _finished(cfg):
    """Whether cfg.model_dir holds this run finished: results.json, and as many epochs (a
    finished run given more --epochs resumes and trains on)."""
    try:
        with open(os.path.join(cfg.model_dir, "flags.json")) as f:
            epochs = json.load(f)["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return epochs == cfg.epochs and os.path.exists(os.path.join(cfg.model_dir, "results.json"))


def _train_timed(cfg, task):
    """train_lib.train_cohort, with the seconds it trained added to earlier sessions' ones."""
    seconds_file = os.path.join(cfg.model_dir, "bench_seconds.json")
    finished_before = _finished(cfg)
    try:
        with open(seconds_file) as f:
            earlier = float(json.load(f)["seconds"])
    except (OSError, ValueError, KeyError):
        # A run finished by another command has no count; an unfinished one starts at zero.
        earlier = None if finished_before else 0.0
    started = time.time()
    try:
        cohort, results = train_lib.train_cohort(cfg, task)
    finally:
        # Also when stopped (SIGINT/SIGTERM): the resumed run adds its time to these seconds.
        # Only into the run's own folder (flags.json written), never a restore's seconds.
        if not finished_before and os.path.exists(os.path.join(cfg.model_dir, "flags.json")):
            earlier += time.time() - started
            run_dir.write_json_atomically(seconds_file, {"seconds": earlier})
    return cohort, results, earlier


def _mean_std(values, digits=2, sign=""):
    """'mean ± sample std' of the values (sign="+" for differences); "n/a" if any is missing."""
    values = np.asarray(values, float)
    if np.isnan(values).any():
        return "n/a"
    text = f"{values.mean():{sign}.{digits}f}"
    return f"{text} ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else text


def _percent(results, key):
    """results[key] in %, nan where the run's results lack it (a run from before the key)."""
    return 100 * results.get(key, float("nan"))


def _columns(nets):
    """[(header, value of (results, entropies))] of the tables: test top-1, agreement, training
    top-1, entropy. Peers carry their network's name when the cohort mixes networks."""
    names = [f"peer{k} {net}" if len(set(nets)) > 1 else f"peer{k}"
             for k, net in enumerate(nets, start=1)]
    cols = [(f"{n} top1", lambda r, e, k=k: _percent(r, f"test/peer{k}/top1"))
            for k, n in enumerate(names, start=1)]
    cols.append(("ensemble top1", lambda r, e: _percent(r, "test/ensemble/top1")))
    if len(nets) > 1:
        cols.append(("agreement", lambda r, e: _percent(r, "test/agreement")))
    cols += [(f"{n} train top1", lambda r, e, k=k: _percent(r, f"train/peer{k}/top1"))
             for k, n in enumerate(names, start=1)]
    cols += [(f"{n} entropy", lambda r, e, k=k: e[k - 1]) for k, n in enumerate(names, start=1)]
    return cols


def _row(cells):
    return "| " + " | ".join(cells) + " |"


def _header(cells):
    return _row(cells) + "\n|" + "---|" * len(cells)


def _number(header, value):
    return "n/a" if np.isnan(value) else f"{value:.{4 if header.endswith('entropy') else 2}f}"


def print_tables(runs, nets, seeds):
    """Per-seed rows, then per method mean ± std (sample std), then paired differences.

    Args:
      runs: {(method, seed): (results dict, training-set entropy per peer, seconds or None)}.
      nets: the cohort's network names, peer 1 first.
      seeds: the seeds, in order.
    """
    cols = _columns(nets)
    print(_header(["method", "seed"] + [h for h, _ in cols] + ["minutes"]))
    for (method, seed), (results, entropy, seconds) in runs.items():
        minutes = "n/a" if seconds is None else f"{seconds / 60:.1f}"
        print(_row([method, str(seed)] + [_number(h, f(results, entropy)) for h, f in cols]
                   + [minutes]))
    methods = list(dict.fromkeys(m for m, _ in runs))
    if len(seeds) < 2:
        return
    print(f"\nMean ± std over seeds {', '.join(map(str, seeds))}:\n")
    print(_header(["method"] + [h for h, _ in cols]))
    for method in methods:
        print(_row([method] + [_mean_std([f(*runs[method, s][:2]) for s in seeds],
                                         digits=4 if h.endswith("entropy") else 2)
                               for h, f in cols]))
    top1 = [(h[:-len(" top1")], f) for h, f in cols if h.endswith(" top1")
            and not h.endswith("train top1")]
    base = methods[0]
    for method in methods[1:]:
        print(f"\nPaired difference {method} − {base}, test top-1 points, per seed:\n")
        print(_header(["seed"] + [n for n, _ in top1]))
        diffs = {n: [f(*runs[method, s][:2]) - f(*runs[base, s][:2]) for s in seeds]
                 for n, f in top1}
        for j, seed in enumerate(seeds):
            print(_row([str(seed)] + [f"{diffs[n][j]:+.2f}" for n, _ in top1]))
        print(_row(["mean ± std"] + [_mean_std(diffs[n], sign="+") for n, _ in top1]))


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        run_all()
    except UserError as e:  # a flag, file or run folder to fix: one line, as the run scripts
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except train_lib.Interrupted as e:  # SIGINT/SIGTERM: the same command resumes
        print(f"\n{e}", file=sys.stderr)  # after the progress bar's line
        sys.exit(128 + e.signum)


def run_all():
    """Every precision, seed and method (restored, resumed or trained), then the tables."""
    if not FLAGS.npz:
        raise UserError(f"pass --npz at the CIFAR-10 subset .npz (or set {NPZ_VARIABLE}).")
    if not os.path.exists(FLAGS.npz):
        raise UserError(f"--npz={FLAGS.npz} not found; pass the path of "
                        "cifar10_subset_train4000_test1000.npz.")
    nets = list(config_lib.parse_nets(FLAGS.nets))
    data = load_subset(FLAGS.npz)
    seeds = [int(s) for s in FLAGS.seeds]
    runs = {}
    for precision in FLAGS.precisions:
        for seed in seeds:
            for method in FLAGS.methods:
                name = method if precision == "float32" else f"{method} ({precision})"
                runs[name, seed] = run_one(data, method, precision, seed)
    print(f"\nReal CIFAR-10 subset (4000 train / 1000 test), {FLAGS.nets}, {FLAGS.epochs} epochs, "
          f"lr {FLAGS.learning_rate} (warm-up {FLAGS.warmup_epochs} epochs, ×0.1 every "
          f"{max(1, round(FLAGS.decay_at * FLAGS.epochs))}), {FLAGS.update}, TF {tf.__version__}\n")
    print_tables(runs, nets, seeds)


if __name__ == "__main__":
    app.run(main)
