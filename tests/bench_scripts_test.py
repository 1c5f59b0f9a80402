"""The real-image bench's tables and curves: against numpy and hand-written event files.

Both scripts define absl flags at import, so each runs in its own process here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per method, per seed: (peer1, peer2, ensemble) top-1 in [0, 1], and the peers' entropies.
TOP1 = {"independent": {0: (0.50, 0.52, 0.55), 1: (0.48, 0.47, 0.51), 2: (0.53, 0.50, 0.56)},
        "dml": {0: (0.55, 0.51, 0.54), 1: (0.49, 0.52, 0.53), 2: (0.51, 0.57, 0.58)}}
ENTROPY = {"independent": (0.9, 1.0), "dml": (1.2, 1.3)}


def _python(code, *args):
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _table_rows(text, title):
    """The rows (lists of cells) of the markdown table printed after the line `title`."""
    lines = text[text.index(title):].splitlines()[1:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[2:]  # below the header and the ---


def test_seeded_tables_give_mean_sample_std_and_paired_differences():
    runs = {(m, s): ({"test/peer1/top1": v[0], "test/peer2/top1": v[1],
                      "test/ensemble/top1": v[2]}, list(ENTROPY[m]), 60.0)
            for m, seeds in TOP1.items() for s, v in seeds.items()}
    code = ("import json, sys; sys.path.insert(0, 'bench'); given = json.loads(sys.argv[1])\n"
            "import cifar10_subset as b\n"
            "from absl import flags; flags.FLAGS(['x'])\n"
            "runs = {tuple(k.split('/')): v for k, v in given.items()}\n"
            "runs = {(m, int(s)): v for (m, s), v in runs.items()}\n"
            "b.print_tables(runs, 2, [0, 1, 2])\n")
    out = _python(code, json.dumps({f"{m}/{s}": v for (m, s), v in runs.items()}))

    summary = {row[0]: row[1:] for row in _table_rows(out, "Mean ± std over seeds 0, 1, 2:")}
    for method, seeds in TOP1.items():
        values = 100 * np.array([seeds[s] for s in (0, 1, 2)])  # [seed, name]
        expected = [f"{m:.2f} ± {s:.2f}" for m, s in zip(values.mean(0), values.std(0, ddof=1))]
        assert summary[method][:3] == expected
    diff_rows = _table_rows(out, "Paired difference dml − independent")
    diffs = 100 * (np.array([TOP1["dml"][s] for s in (0, 1, 2)])
                   - np.array([TOP1["independent"][s] for s in (0, 1, 2)]))
    for seed, row in zip((0, 1, 2), diff_rows[:3]):
        assert row == [str(seed)] + [f"{d:+.2f}" for d in diffs[seed]]
    assert diff_rows[3] == ["mean ± std"] + [
        f"{m:+.2f} ± {s:.2f}" for m, s in zip(diffs.mean(0), diffs.std(0, ddof=1))]


def _write_events(run_dir, step_values):
    """One event file holding test/peer{k}/top1 at the given {step: (peer1, peer2)}."""
    writer = tf.summary.create_file_writer(str(run_dir))
    with writer.as_default():
        for step, values in step_values.items():
            for k, value in enumerate(values, start=1):
                tf.summary.scalar(f"test/peer{k}/top1", value, step=step)
            tf.summary.scalar("train/peer1/ce", 9.0, step=step)  # not a curve
    writer.close()


def test_curves_are_read_per_epoch_across_resumed_event_files(tmp_path):
    run = tmp_path / "dml_seed0"
    _write_events(run, {62: (0.2, 0.3), 124: (0.4, 0.5)})
    # A resumed run: a second event file, repeating the evaluation of step 124 it was stopped in.
    _write_events(run, {124: (0.4, 0.5), 186: (0.6, 0.7)})
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    code = ("import json, sys; sys.path.insert(0, 'bench')\n"
            "import plot_curves\n"
            "print(json.dumps(plot_curves.read_curves(sys.argv[1])))\n")
    curves = json.loads(_python(code, str(run)))
    expected = {"1": {"1": 0.2, "2": 0.4, "3": 0.6}, "2": {"1": 0.3, "2": 0.5, "3": 0.7}}
    assert {k: {e: round(v, 6) for e, v in c.items()} for k, c in curves.items()} == expected


def test_curves_png_is_written_for_every_method_and_seed(tmp_path):
    for method in ("dml", "independent"):
        for seed in (0, 1):
            _write_events(tmp_path / f"{method}_seed{seed}", {62: (0.2, 0.3), 124: (0.4, 0.5)})
    (tmp_path / "notes").mkdir()  # not a run: ignored
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "bench/plot_curves.py", f"--runs_dir={tmp_path}",
                           f"--out={out}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "bench/plot_curves.py", f"--runs_dir={empty}",
                           f"--out={out}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "no <method>_seed<s> runs" in proc.stderr
