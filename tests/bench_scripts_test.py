"""The real-image bench's tables, curves and diagnostics: against numpy and hand-written event files.

The scripts define absl flags at import, so each runs in its own process here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)
# Per method, per seed: (peer1, peer2, ensemble) test top-1, agreement and the peers'
# last-epoch training top-1, in [0, 1]; and the peers' entropies.
TOP1 = {"independent": {0: (0.50, 0.52, 0.55), 1: (0.48, 0.47, 0.51), 2: (0.53, 0.50, 0.56)},
        "dml": {0: (0.55, 0.51, 0.54), 1: (0.49, 0.52, 0.53), 2: (0.51, 0.57, 0.58)}}
AGREEMENT = {"independent": {0: 0.71, 1: 0.69, 2: 0.74}, "dml": {0: 0.83, 1: 0.86, 2: 0.81}}
TRAIN_TOP1 = {"independent": {0: (0.991, 0.987), 1: (0.995, 0.99), 2: (0.989, 0.993)},
              "dml": {0: (0.97, 0.975), 1: (0.968, 0.981), 2: (0.977, 0.972)}}
ENTROPY = {"independent": (0.9, 1.0), "dml": (1.2, 1.3)}


def _python(code, *args):
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _script(name, *args):
    return subprocess.run([sys.executable, f"bench/{name}", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def _table(text, title):
    """({header: column index}, rows as lists of cells) of the markdown table after `title`."""
    lines = text[text.index(title):].splitlines()[1:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return {name: i for i, name in enumerate(rows[0])}, rows[2:]  # header, below the ---


def _bench_tables(nets):
    runs = {f"{m}/{s}": ({"test/peer1/top1": v[0], "test/peer2/top1": v[1],
                          "test/ensemble/top1": v[2], "test/agreement": AGREEMENT[m][s],
                          "train/peer1/top1": TRAIN_TOP1[m][s][0],
                          "train/peer2/top1": TRAIN_TOP1[m][s][1]}, list(ENTROPY[m]), 60.0)
            for m, seeds in TOP1.items() for s, v in seeds.items()}
    code = ("import json, sys; sys.path.insert(0, 'bench'); given = json.loads(sys.argv[1])\n"
            "import cifar10_subset as b\n"
            "from absl import flags; flags.FLAGS(['x'])\n"
            "runs = {tuple(k.split('/')): v for k, v in given.items()}\n"
            "runs = {(m, int(s)): v for (m, s), v in runs.items()}\n"
            "b.print_tables(runs, sys.argv[2].split(','), [0, 1, 2])\n")
    return _python(code, json.dumps(runs), nets)


def _mean_std(values, sign=""):
    return [f"{m:{sign}.2f} ± {s:.2f}" for m, s in zip(values.mean(0), values.std(0, ddof=1))]


def test_seeded_tables_give_mean_sample_std_and_paired_differences():
    out = _bench_tables("resnet32,resnet32")
    columns, rows = _table(out, "Mean ± std over seeds 0, 1, 2:")
    summary = {row[0]: row for row in rows}
    for method in TOP1:
        test = 100 * np.array([TOP1[method][s] for s in SEEDS])  # [seed, peer1/peer2/ensemble]
        assert [summary[method][columns[f"{n} top1"]] for n in ("peer1", "peer2", "ensemble")
                ] == _mean_std(test)
        agreement = 100 * np.array([[AGREEMENT[method][s]] for s in SEEDS])
        assert [summary[method][columns["agreement"]]] == _mean_std(agreement)
        train = 100 * np.array([TRAIN_TOP1[method][s] for s in SEEDS])
        assert [summary[method][columns[f"{n} train top1"]] for n in ("peer1", "peer2")
                ] == _mean_std(train)
    columns, diff_rows = _table(out, "Paired difference dml − independent")
    assert list(columns) == ["seed", "peer1", "peer2", "ensemble"]  # test top-1 only
    diffs = 100 * (np.array([TOP1["dml"][s] for s in SEEDS])
                   - np.array([TOP1["independent"][s] for s in SEEDS]))
    for seed, row in zip(SEEDS, diff_rows[:3]):
        assert row == [str(seed)] + [f"{d:+.2f}" for d in diffs[seed]]
    assert diff_rows[3] == ["mean ± std"] + _mean_std(diffs, sign="+")


def test_heterogeneous_tables_name_each_peers_network():
    out = _bench_tables("mobilenet,resnet32")
    columns, rows = _table(out, "Mean ± std over seeds 0, 1, 2:")
    dml = {row[0]: row for row in rows}["dml"]
    test = 100 * np.array([TOP1["dml"][s] for s in SEEDS])
    assert dml[columns["peer1 mobilenet top1"]] == _mean_std(test)[0]
    assert dml[columns["peer2 resnet32 top1"]] == _mean_std(test)[1]
    train = 100 * np.array([TRAIN_TOP1["dml"][s] for s in SEEDS])
    assert dml[columns["peer2 resnet32 train top1"]] == _mean_std(train)[1]
    columns, _ = _table(out, "Paired difference dml − independent")
    assert list(columns) == ["seed", "peer1 mobilenet", "peer2 resnet32", "ensemble"]


def _write_events(run_dir, epochs, per_epoch=None, every=None, nets=None):
    """One event file with, at step 62·epoch, test/peer{k}/top1 from `epochs` {epoch: (p1, p2)}
    and the other tags of `per_epoch` {tag: {epoch: value}}; also a flags.json naming `nets`."""
    writer = tf.summary.create_file_writer(str(run_dir))
    with writer.as_default():
        for epoch, values in epochs.items():
            for k, value in enumerate(values, start=1):
                tf.summary.scalar(f"test/peer{k}/top1", value, step=62 * epoch)
            for tag, by_epoch in (per_epoch or {}).items():
                if epoch in by_epoch:
                    tf.summary.scalar(tag, by_epoch[epoch], step=62 * epoch)
    writer.close()
    if nets:
        (run_dir / "flags.json").write_text(json.dumps({"nets": nets}))


def _read_scalars(run):
    code = ("import json, sys; sys.path.insert(0, 'bench')\n"
            "import run_events\n"
            "print(json.dumps(run_events.read_scalars(sys.argv[1])))\n")
    scalars = json.loads(_python(code, str(run)))
    return {tag: {int(e): round(v, 6) for e, v in c.items()} for tag, c in scalars.items()}


def test_scalars_are_read_per_epoch_across_resumed_event_files(tmp_path):
    run = tmp_path / "dml_seed0"
    _write_events(run, {1: (0.2, 0.3), 2: (0.4, 0.5)}, {"train/peer1/ce": {1: 2.0, 2: 1.5}})
    # A resumed run: a second event file, repeating epoch 2 (the evaluation it was stopped
    # in, now with other values: the later ones count) and going on to epoch 3.
    _write_events(run, {2: (0.45, 0.55), 3: (0.6, 0.7)}, {"train/peer1/ce": {2: 1.4, 3: 1.0},
                                                          "test/agreement": {3: 0.8}})
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    scalars = _read_scalars(run)
    assert scalars["test/peer1/top1"] == {1: 0.2, 2: 0.45, 3: 0.6}
    assert scalars["test/peer2/top1"] == {1: 0.3, 2: 0.55, 3: 0.7}
    assert scalars["train/peer1/ce"] == {1: 2.0, 2: 1.4, 3: 1.0}
    assert scalars["test/agreement"] == {3: 0.8}  # written at epoch 3 only: keeps its number


def test_curves_png_is_written_for_every_method_and_seed(tmp_path):
    for method in ("dml", "independent"):
        for seed in (0, 1):
            _write_events(tmp_path / f"{method}_seed{seed}", {1: (0.2, 0.3), 2: (0.4, 0.5)},
                          {"train/peer1/top1": {1: 0.3, 2: 0.6}, "train/peer2/top1": {1: 0.3, 2: 0.6}},
                          nets=["mobilenet", "resnet32"])
    (tmp_path / "notes").mkdir()  # not a run: ignored
    out = tmp_path / "curves.png"
    proc = _script("plot_curves.py", f"--runs_dir={tmp_path}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = ("import json, sys; sys.path.insert(0, 'bench')\n"
            "import plot_curves\n"
            "runs, labels = plot_curves.read_runs(sys.argv[1])\n"
            "print(json.dumps([sorted(runs), {m: sorted(s) for m, s in runs.items()}, labels]))\n")
    methods, seeds, labels = json.loads(_python(code, str(tmp_path)))
    assert methods == ["dml", "independent"] and seeds == {"dml": [0, 1], "independent": [0, 1]}
    assert labels == {"1": "peer 1 (mobilenet)", "2": "peer 2 (resnet32)"}
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _script("plot_curves.py", f"--runs_dir={empty}", f"--out={out}")
    assert proc.returncode != 0 and "no <method>_seed<s> runs" in proc.stderr


# Hand-written diagnostics: per method, per seed, per tag, per epoch 1..4.
DIAG = {
    "dml": {
        0: {"train/peer1/top1": [0.40, 0.80, 0.990, 0.995], "train/peer2/top1": [0.42, 0.79, 0.985, 0.996],
            "train/peer1/ce": [1.6, 0.7, 0.06, 0.04], "train/peer2/ce": [1.5, 0.8, 0.07, 0.03],
            "train/peer1/mimicry": [0.02, 0.05, 0.03, 0.02], "train/peer2/mimicry": [0.03, 0.04, 0.02, 0.02],
            "train/peer1/entropy": [1.8, 1.1, 0.5, 0.4], "train/peer2/entropy": [1.7, 1.2, 0.6, 0.4],
            "test/agreement": [0.5, 0.7, 0.8, 0.85], "lr/peer1": [0.05, 0.1, 0.01, 0.001]},
        1: {"train/peer1/top1": [0.38, 0.82, 0.992, 0.993], "train/peer2/top1": [0.41, 0.81, 0.991, 0.994],
            "train/peer1/ce": [1.7, 0.6, 0.05, 0.03], "train/peer2/ce": [1.6, 0.7, 0.05, 0.04],
            "train/peer1/mimicry": [0.01, 0.06, 0.04, 0.03], "train/peer2/mimicry": [0.02, 0.05, 0.03, 0.01],
            "train/peer1/entropy": [1.9, 1.0, 0.4, 0.3], "train/peer2/entropy": [1.8, 1.1, 0.5, 0.3],
            "test/agreement": [0.45, 0.72, 0.83, 0.84], "lr/peer1": [0.05, 0.1, 0.01, 0.001]},
    },
    "independent": {  # no mimicry tags, as the independent method logs none
        0: {"train/peer1/top1": [0.45, 0.85, 0.991, 0.999], "train/peer2/top1": [0.44, 0.86, 0.97, 0.998],
            "train/peer1/ce": [1.4, 0.5, 0.03, 0.01], "train/peer2/ce": [1.4, 0.5, 0.04, 0.01],
            "train/peer1/entropy": [1.6, 0.9, 0.2, 0.1], "train/peer2/entropy": [1.6, 0.9, 0.2, 0.1],
            "test/agreement": [0.4, 0.6, 0.7, 0.72], "lr/peer1": [0.05, 0.1, 0.01, 0.001]},
    },
}
TEST_TOP1 = {"dml": {0: [(0.3, 0.31), (0.5, 0.52), (0.6, 0.61), (0.62, 0.63)],
                     1: [(0.29, 0.3), (0.51, 0.5), (0.58, 0.6), (0.6, 0.62)]},
             "independent": {0: [(0.33, 0.32), (0.55, 0.54), (0.64, 0.65), (0.66, 0.66)]}}


def test_diagnostics_table_is_the_mean_over_seeds_of_the_events(tmp_path):
    for method, seeds in DIAG.items():
        for seed, tags in seeds.items():
            run = tmp_path / f"{method}_seed{seed}"
            test = dict(enumerate(TEST_TOP1[method][seed], start=1))
            # Two sessions: the second repeats epoch 2 as a resumed run does.
            split = {tag: dict(enumerate(v[:2], start=1)) for tag, v in tags.items()}
            _write_events(run, {e: test[e] for e in (1, 2)}, split)
            rest = {tag: dict(enumerate(v, start=1)) for tag, v in tags.items()}
            _write_events(run, {e: test[e] for e in (2, 3, 4)},
                          {tag: {e: v[e] for e in (2, 3, 4)} for tag, v in rest.items()},
                          nets=["mobilenet", "resnet32"] if method == "dml" else None)
    (tmp_path / "dml_seed0" / "bench_seconds.json").write_text('{"seconds": 750.0}')
    proc = _script("diagnostics.py", f"--runs_dir={tmp_path}", "--at_epochs=1,3,4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout

    columns, rows = _table(out, "dml (mean over seeds 0, 1; peer 1 mobilenet; peer 2 resnet32):")
    assert [row[0] for row in rows] == ["1", "3", "4"]
    seeds = DIAG["dml"].values()
    for row, epoch in zip(rows, (1, 3, 4)):
        def mean(tag, scale=1.0):
            return scale * np.mean([s[tag][epoch - 1] for s in seeds])
        for k in (1, 2):
            assert float(row[columns[f"peer{k} train top1"]]) == pytest.approx(
                mean(f"train/peer{k}/top1", 100), rel=1e-4, abs=0.006)
            assert float(row[columns[f"peer{k} CE"]]) == pytest.approx(
                mean(f"train/peer{k}/ce"), rel=1e-3, abs=6e-5)
            assert float(row[columns[f"peer{k} mimicry"]]) == pytest.approx(
                mean(f"train/peer{k}/mimicry"), rel=1e-3, abs=6e-5)
            assert float(row[columns[f"peer{k} entropy"]]) == pytest.approx(
                mean(f"train/peer{k}/entropy"), rel=1e-3, abs=6e-5)
            test = 100 * np.mean([TEST_TOP1["dml"][s][epoch - 1][k - 1] for s in (0, 1)])
            assert float(row[columns[f"peer{k} test top1"]]) == pytest.approx(test, rel=1e-4, abs=0.006)
        assert float(row[columns["agreement"]]) == pytest.approx(
            mean("test/agreement", 100), rel=1e-4, abs=0.006)
        assert float(row[columns["next lr"]]) == pytest.approx(mean("lr/peer1"), rel=1e-3, abs=6e-6)

    columns, rows = _table(out, "independent (mean over seeds 0):")
    assert rows[-1][columns["peer1 mimicry"]] == "–"  # logged by no run of the method
    assert float(rows[-1][columns["peer2 CE"]]) == pytest.approx(0.01, rel=1e-3, abs=6e-5)

    # Fitted: from the epoch on which every peer's training top-1 stays >= 99 %.
    assert ("dml seed 0: 4 epochs, every peer's training top-1 >= 99 % from epoch 4; last "
            "epoch's training top-1 99.50 / 99.60 %; 12.5 minutes.") in out
    assert "dml seed 1: 4 epochs, every peer's training top-1 >= 99 % from epoch 3;" in out
    assert ("independent seed 0: 4 epochs, every peer's training top-1 >= 99 % from epoch 4;"
            in out) and "minutes not recorded" in out
    proc = _script("diagnostics.py", f"--runs_dir={tmp_path}", "--fit_threshold=0.9995")
    assert "dml seed 0: 4 epochs, training top-1 never stayed >= 99.95 % for every peer" in proc.stdout


def test_bench_minutes_add_up_over_the_sessions_that_trained_a_run(tmp_path):
    """A run stopped in one session and finished in the next counts both sessions' seconds;
    restoring the finished run adds none, training it on to more epochs adds its own
    (train_cohort replaced by timed fakes that write what a run writes)."""
    code = ("import dataclasses, json, os, sys, time; sys.path.insert(0, 'bench')\n"
            "import cifar10_subset as b\n"
            "from dml_tf import config as config_lib\n"
            "model_dir = sys.argv[1]\n"
            "cfg = config_lib.Config(model_dir=model_dir, epochs=3)\n"
            "def training(seconds, stop=False):\n"
            "    def train_cohort(cfg, task):\n"
            "        os.makedirs(model_dir, exist_ok=True)\n"
            "        open(os.path.join(model_dir, 'flags.json'), 'w').write(\n"
            "            json.dumps({'epochs': cfg.epochs}))\n"
            "        time.sleep(seconds)\n"
            "        if stop:\n"
            "            raise KeyboardInterrupt\n"
            "        open(os.path.join(model_dir, 'results.json'), 'w').write('{}')\n"
            "        return 'cohort', {}\n"
            "    return train_cohort\n"
            "b.train_lib.train_cohort = training(0.6, stop=True)\n"
            "try:\n"
            "    b._train_timed(cfg, None)\n"
            "except KeyboardInterrupt:\n"
            "    pass\n"
            "first = json.load(open(os.path.join(model_dir, 'bench_seconds.json')))['seconds']\n"
            "b.train_lib.train_cohort = training(0.4)\n"
            "total = b._train_timed(cfg, None)[2]\n"
            "b.train_lib.train_cohort = training(0.3)  # a restore: nothing trained\n"
            "restored = b._train_timed(cfg, None)[2]\n"
            "b.train_lib.train_cohort = training(0.5)\n"
            "longer = b._train_timed(dataclasses.replace(cfg, epochs=5), None)[2]\n"
            "print(json.dumps([first, total, restored, longer]))\n")
    out = _python(code, str(tmp_path / "dml_seed0")).splitlines()[-1]
    first, total, restored, longer = json.loads(out)
    assert 0.6 <= first < 3.0
    assert first + 0.4 <= total < first + 3.0
    assert restored == total
    assert total + 0.5 <= longer < total + 3.0


def test_finished_runs_are_archived_without_checkpoints_and_read_back(tmp_path):
    """A run folder as train_lib leaves it (hand-written files, a checkpoint, an export) is
    archived without the checkpoint and export; the archive is read back as the same results,
    entropies and minutes, and refused, naming the setting, under another schedule."""
    model_dir, archive = tmp_path / "runs" / "dml_seed0", tmp_path / "archive" / "dml_seed0"
    (model_dir / "checkpoints").mkdir(parents=True)
    (model_dir / "checkpoints" / "ckpt-3.index").write_bytes(b"\0" * 10)
    (model_dir / "export" / "peer1").mkdir(parents=True)
    (model_dir / "results.json").write_text(json.dumps({"test/peer1/top1": 0.625}))
    (model_dir / "bench_seconds.json").write_text(json.dumps({"seconds": 754.5}))
    (model_dir / "events.out.tfevents.1796000000.host").write_bytes(b"events")
    code = ("import json, sys; sys.path.insert(0, 'bench')\n"
            "import cifar10_subset as b\n"
            "from dml_tf import config as config_lib\n"
            "from dml_tf.errors import UserError\n"
            "model_dir, archive = sys.argv[1], sys.argv[2]\n"
            "cfg = config_lib.Config(model_dir=model_dir, epochs=150, lr_decay_epochs=60,\n"
            "                        data_dir='/machine/data/subset.npz')\n"
            "open(model_dir + '/flags.json', 'w').write(cfg.to_json())\n"
            "b.archive_run(model_dir, archive, [0.25, 0.5])\n"
            "results, entropy, seconds = b.load_archived(archive, config_lib.Config(\n"
            "    model_dir='/elsewhere', epochs=150, lr_decay_epochs=60))\n"
            "print(json.dumps([results, list(entropy), seconds]))\n"
            "for other in (dict(epochs=150, lr_decay_epochs=50), dict(epochs=120, lr_decay_epochs=60)):\n"
            "    try:\n"
            "        b.load_archived(archive, config_lib.Config(model_dir=model_dir, **other))\n"
            "    except UserError as e:\n"
            "        print(e)\n")
    out = _python(code, str(model_dir), str(archive)).splitlines()
    assert json.loads(out[0]) == [{"test/peer1/top1": 0.625}, [0.25, 0.5], 754.5]
    assert sorted(os.listdir(archive)) == ["bench_entropy.json", "bench_seconds.json",
                                           "events.out.tfevents.1796000000.host",
                                           "flags.json", "results.json"]
    assert (archive / "events.out.tfevents.1796000000.host").read_bytes() == b"events"
    archived_flags = json.loads((archive / "flags.json").read_text())
    assert archived_flags["model_dir"] == "dml_seed0" and archived_flags["epochs"] == 150
    assert archived_flags["data_dir"] == "subset.npz"
    assert "other lr_decay_epochs than" in out[1] and "--archive_dir" in out[1]
    assert "other epochs than" in out[2]


def test_vs_pytorch_counts_resnet32_training_flops_by_hand():
    """bench/vs_pytorch.py's GFLOP per image against He et al.'s ResNet-32 counted by hand:
    a 3x3 stem conv, then 3 stages of 10 3x3 convs (16, 32, 64 channels at 32², 16², 8²), the
    first of stages 2 and 3 from half the channels at stride 2, and a 64 x 100 dense layer."""
    def conv(size, cin, cout):
        return size * size * cout * 9 * cin

    macs = (conv(32, 3, 16) + 10 * conv(32, 16, 16)
            + conv(16, 16, 32) + 9 * conv(16, 32, 32)
            + conv(8, 32, 64) + 9 * conv(8, 64, 64) + 64 * 100)
    code = ("import sys; sys.path.insert(0, 'bench')\n"
            "import vs_pytorch\n"
            "from dml_tf import nets\n"
            "print(vs_pytorch.training_gflop_per_image(nets.build('resnet32', 100, (32, 32, 3))))\n")
    counted = float(_python(code).splitlines()[-1])
    assert counted == pytest.approx(3 * 2 * macs / 1e9, rel=1e-9)
