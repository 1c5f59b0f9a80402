"""Our runs beside the paper's numbers: a markdown table on standard output.

  python -m dml_tf.report runs/dml runs/independent ... > report.md

One row per run folder (its name, method, networks, dataset) with the final metrics of its
results.json in percent: top-1 per peer and of the ensemble; mAP and rank-1 where the run
has them (Market-1501). Beside each, the paper's number for the same experiment (dataset,
networks, method, pre-training; `dml_tf.paper_numbers`) and the difference ours − paper in
points; "—" where the paper has no counterpart; a value that is not finite reads "nan
(diverged)". Runs analysed with `python -m dml_tf.analysis` also show their training-set
entropy and links to the analysis plots, relative to --link_base (default: the current
directory, where report.md is written), but only when the analysis is of the checkpoint
results.json came from (the run's final, newest checkpoint); otherwise a note under the
table says which checkpoint the analysis is of.
"""

if __name__ == "__main__":  # Before any TensorFlow import: silence its C++ start-up lines.
    from dml_tf import quiet_start
    quiet_start.quiet()

import json
import math
import numbers
import os
import sys
import time

from dml_tf import checkpoints, paper_numbers
from dml_tf.errors import UserError

DASH = "—"
ENTROPY_TITLE = "train entropy (nats)"

# (column title, results.json key or "{k}" pattern of a per-peer key). Groups no run has are
# left out of the table, and so are paper/Δ columns without any paper number.
METRIC_GROUPS = (
    ("top-1 % (peers)", "test/peer{k}/top1"),
    ("ensemble top-1 %", "test/ensemble/top1"),
    ("mAP % (peers)", "test/peer{k}/mAP"),
    ("mean mAP %", "test/mean/mAP"),
    ("mean rank-1 %", "test/mean/rank1"),
    ("ensemble mAP %", "test/ensemble/mAP"),
    ("multi-query mean mAP %", "test/mean/mq_mAP"),
    ("multi-query mean rank-1 %", "test/mean/mq_rank1"),
)
PLOT_LABELS = (("entropy", "entropy"), ("noise", "noise"), ("top5", "top-5"), ("tsne", "t-SNE"))


def _load_json(path):
    """The JSON value in `path`, or None where the file does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}); check the file.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); rerun or delete it.") from None


def _json_type(value):
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            type(None): "null"}.get(type(value), "a number")


def _object(path, value, what, fix):
    """`value` (loaded from `path`) when it is a JSON object; else one sentence."""
    if value is not None and not isinstance(value, dict):
        raise UserError(f"{path} holds {_json_type(value)}, not {what} (a JSON object); {fix}.")
    return value


def _check_flags(path, flags):
    """The fields of a run's flags.json the report reads, each of the type a run writes."""
    for key in ("dataset", "method", "init", "init_checkpoint"):
        if flags.get(key) is not None and not isinstance(flags[key], str):
            raise UserError(f"{path}: \"{key}\" is {_json_type(flags[key])}, not a string; "
                            "restore the run's flags.json.")
    nets, args = flags.get("nets", []), flags.get("method_args") or []
    if not (isinstance(nets, list) and all(isinstance(n, str) for n in nets)):
        raise UserError(f"{path}: \"nets\" is {json.dumps(nets)[:60]}, not a list of network "
                        "names; restore the run's flags.json.")
    if not (isinstance(args, list) and all(isinstance(a, list) and len(a) == 2 for a in args)):
        raise UserError(f"{path}: \"method_args\" is {json.dumps(args)[:60]}, not a list of "
                        "[name, value] pairs; restore the run's flags.json.")


def _check_numbers(path, values, keys, fix):
    """Refuses a value under `keys` (the ones the report shows) that is not a number."""
    for key in keys:
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise UserError(f"{path}: \"{key}\" is {_json_type(value)}, not a number; {fix}.")


class Progress:
    """Progress lines of the report and analysis command lines: seconds since the start, then
    the message.

    Plain lines, flushed one by one, with no carriage return or colour code, so that a log
    file or a pipe reads as a terminal does. (Here, not in dml_tf.analysis, because this
    module imports no TensorFlow.)
    """

    def __init__(self, stream=None):
        self._stream = stream  # None: sys.stdout at each call (pytest swaps it)
        self._start = time.monotonic()

    def __call__(self, message):
        print(f"[{time.monotonic() - self._start:6.1f} s] {message}",
              file=self._stream or sys.stdout, flush=True)


def read_run(run_dir):
    """A run folder's flags.json, results.json and analysis.json (None where absent), checked.

    Also "final_checkpoint": the name of the newest checkpoint in run_dir/checkpoints, the
    one results.json came from when the run has finished (None without checkpoints).

    Raises:
      UserError: the folder holds no flags.json (not a run's --model_dir), or one of the
        files is not what a run writes (not an object, a value of the wrong type).
    """
    path = os.path.join(run_dir, "flags.json")
    flags = _object(path, _load_json(path), "a run's flags", "restore the run's flags.json")
    if flags is None:
        raise UserError(f"{run_dir} holds no flags.json; pass the --model_dir folders of runs.")
    _check_flags(path, flags)
    num_peers = len(flags.get("nets", ())) or 1
    path = os.path.join(run_dir, "results.json")
    fix = "rerun the run's evaluation or delete the file"
    results = _object(path, _load_json(path), "a run's metrics", fix)
    if results is not None:
        _check_numbers(path, results, [k for _, pattern in METRIC_GROUPS
                                       for k in _keys(pattern, num_peers)], fix)
    path = os.path.join(run_dir, "analysis.json")
    analysis = _object(path, _load_json(path), "an analysis",
                       "rerun python -m dml_tf.analysis or delete the file")
    if analysis is not None:
        _check_analysis(path, analysis, num_peers)
    newest = checkpoints.prefixes(os.path.join(run_dir, "checkpoints"))
    return {"dir": run_dir, "name": os.path.basename(os.path.normpath(run_dir)), "flags": flags,
            "results": results, "analysis": analysis,
            "final_checkpoint": os.path.basename(newest[0]) if newest else None}


def _check_analysis(path, analysis, num_peers):
    fix = "rerun python -m dml_tf.analysis or delete the file"
    for key in ("peers", "plots", "checkpoint"):
        if analysis.get(key) is not None and not isinstance(analysis[key], dict):
            raise UserError(f"{path}: \"{key}\" is {_json_type(analysis[key])}, not an object; "
                            f"{fix}.")
    for k in range(1, num_peers + 1):
        peer = (analysis.get("peers") or {}).get(f"peer{k}") or {}
        _object(path, peer, f"peer{k}'s analysis", fix)
        _check_numbers(path, peer, ["entropy"], fix)


def is_pretrained(flags):
    """Whether the run started from pre-trained weights (paper Table 3's "pre?")."""
    return flags.get("init", "scratch") not in (None, "", "scratch") or bool(
        flags.get("init_checkpoint"))


def paper_for(run):
    """(metrics, sources) of the paper for this run's experiment, or None."""
    flags = run["flags"]
    return paper_numbers.lookup(flags.get("dataset"), flags.get("nets", ()), flags.get("method"),
                                pretrained=is_pretrained(flags))


def as_percent(value):
    """results.json keeps fractions (docs/design.md); a value above 1 is taken as percent already."""
    return None if value is None else (value if value > 1.0 else 100.0 * value)


def _keys(pattern, num_peers):
    if "{k}" in pattern:
        return [pattern.format(k=k) for k in range(1, num_peers + 1)]
    return [pattern]


def _number(value, digits=2):
    if value is None:
        return DASH
    if not math.isfinite(value):  # a bare "nan" would read as a number
        return f"{value} (diverged)"
    return f"{value:.{digits}f}"


def _difference(ours, paper, digits=2):
    if ours is None or paper is None or not math.isfinite(ours):
        return DASH
    return f"{ours - paper:+.{digits}f}"


def _cells(ours, paper, digits=2):
    """(ours, paper, Δ) cells for aligned lists of values (one per peer, or one)."""
    join = " / ".join
    return (join(_number(o, digits) for o in ours), join(_number(p, digits) for p in paper),
            join(_difference(o, p, digits) for o, p in zip(ours, paper)))


def _run_columns(run, link_base):
    """{column group: (ours list, paper list)}, sources, and the plots cell of one run."""
    flags, results = run["flags"], run["results"] or {}
    num_peers = len(flags.get("nets", ())) or 1
    paper, sources = paper_for(run) or ({}, {})
    groups, used_sources = {}, set()
    for title, pattern in METRIC_GROUPS:
        keys = _keys(pattern, num_peers)
        ours = [as_percent(results.get(k)) for k in keys]
        theirs = [paper.get(k) for k in keys]
        if any(v is not None for v in ours) or any(v is not None for v in theirs):
            groups[title] = (ours, theirs)
            used_sources.update(sources[k] for k in keys if k in paper)
    analysis = run["analysis"] if analysis_note(run) is None else {}
    peers = (analysis or {}).get("peers") or {}
    if peers:
        ours = [(peers.get(f"peer{k}") or {}).get("entropy") for k in range(1, num_peers + 1)]
        nets = list(flags.get("nets", ()))
        theirs = [paper_numbers.train_entropy(flags.get("dataset"), net, flags.get("method"))
                  for net in nets]
        groups[ENTROPY_TITLE] = (ours, theirs)
        if any(v is not None for v in theirs):
            used_sources.add("Sec. 4.8")
    links = []
    for key, label in PLOT_LABELS:
        name = ((analysis or {}).get("plots") or {}).get(key)
        path = os.path.join(run["dir"], name) if name else None
        if path and os.path.exists(path):
            links.append(f"[{label}]({os.path.relpath(path, link_base)})")
    return groups, sorted(used_sources), " ".join(links) or DASH


def describe_position(checkpoint):
    """'ckpt-220, after epoch 5', or 'ckpt-60, epoch 2 at step 16' (saved within an epoch, as
    the training loop's messages number them)."""
    if checkpoint["step_in_epoch"] == 0 and checkpoint["closed"]:
        return f"{checkpoint['name']}, after epoch {checkpoint['epoch']}"
    return f"{checkpoint['name']}, epoch {checkpoint['epoch'] + 1} at step {checkpoint['step_in_epoch']}"


def analysis_note(run):
    """Why the run's analysis.json is not shown beside its results.json, or None when it is.

    Its numbers are shown only when they are of the checkpoint results.json came from: the
    analysis is of a finished run's final checkpoint, and that is still the run's newest one
    (a run trained on afterwards has a newer one, and maybe a results.json of it).
    """
    analysis = run["analysis"]
    if analysis is None:
        return None
    checkpoint = analysis.get("checkpoint")
    rerun = f"rerun python -m dml_tf.analysis --model_dir={run['dir']}"
    if not checkpoint or not isinstance(checkpoint.get("name"), str):
        return (f"its analysis.json does not say which checkpoint it analysed (an older "
                f"analysis), so its numbers are left out of the table; {rerun}.")
    if run["results"] is not None and checkpoint.get("finished") \
            and checkpoint["name"] == run["final_checkpoint"]:
        return None
    try:
        where = describe_position(checkpoint)
    except (KeyError, TypeError):
        where = checkpoint["name"]
    peers = analysis.get("peers") or {}
    entropy = " / ".join(_number((peers.get(f"peer{k}") or {}).get("entropy"), 4)
                         for k in range(1, len(run["flags"].get("nets", ())) + 1))
    of = f"its analysis.json is of {where}"
    if run["results"] is None:
        why = "there is no results.json to set it beside"
    elif not checkpoint.get("finished"):
        why = "the run had not finished then"
    elif run["final_checkpoint"]:
        why = f"results.json is from {run['final_checkpoint']}, the run's final checkpoint"
    else:
        why = "checkpoints/ is gone, so which checkpoint results.json is from cannot be told"
    return f"{of}, but {why}: its entropy ({entropy} nats) is left out of the table; {rerun}."


def _method_cell(flags):
    args = flags.get("method_args") or []
    extra = ", ".join(f"{k}={v}" for k, v in args)
    return f"{flags.get('method', DASH)}" + (f" ({extra})" if extra else "")


def render(run_dirs, link_base=".", compare_as=None, progress=None):
    """The markdown report of `run_dirs` (see the module docstring).

    `compare_as` names the paper dataset that runs on an .npz subset (dataset "npz", e.g. the
    real 4,000-image CIFAR-10 subset) are set beside; their dataset cell says so. `progress`
    is called with a line per run read (e.g. `Progress(sys.stderr)`); None: silent.
    """
    if not run_dirs:
        raise UserError("Pass at least one run folder: python -m dml_tf.report RUN_DIR ... > report.md")
    runs = []
    for i, run_dir in enumerate(run_dirs, start=1):
        runs.append(read_run(run_dir))
        if progress:
            found = [name for name in ("results", "analysis") if runs[-1][name] is not None]
            progress(f"run {i}/{len(run_dirs)} {run_dir}: flags.json"
                     + "".join(f", {name}.json" for name in found))
    if compare_as:
        for run in runs:
            if run["flags"].get("dataset") == "npz":
                run["flags"] = {**run["flags"], "dataset": compare_as, "subset": True}
    columns = [_run_columns(run, link_base) for run in runs]
    titles = [t for t, _ in METRIC_GROUPS] + [ENTROPY_TITLE]
    present = [t for t in titles if any(t in groups for groups, _, _ in columns)]
    with_paper = {t for t in present
                  if any(any(v is not None for v in groups[t][1])
                         for groups, _, _ in columns if t in groups)}
    header = ["run", "method", "nets", "dataset"]
    for title in present:
        header += [title] + (["paper", "Δ"] if title in with_paper else [])
    header += ["paper source", "analysis plots"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for run, (groups, sources, plots) in zip(runs, columns):
        flags = run["flags"]
        dataset = flags.get("dataset", DASH) + (" (pretrained)" if is_pretrained(flags) else "")
        if flags.get("subset"):
            dataset = f"npz subset, vs paper {flags['dataset']}"
        row = [run["name"], _method_cell(flags), ", ".join(flags.get("nets", ())), dataset]
        for title in present:
            num = len(_keys(dict(METRIC_GROUPS).get(title, "{k}"), len(flags.get("nets", ())) or 1))
            ours, theirs = groups.get(title, ([None] * num, [None] * num))
            digits = 4 if title == ENTROPY_TITLE else 2
            cells = _cells(ours, theirs, digits)
            row += [cells[0]] + (list(cells[1:]) if title in with_paper else [])
        row += [", ".join(sources) or DASH, plots]
        lines.append("| " + " | ".join(row) + " |")
        if run["results"] is None:
            notes.append(f"- {run['name']}: no results.json yet (training unfinished).")
        if analysis_note(run):
            notes.append(f"- {run['name']}: {analysis_note(run)}")
    intro = [
        "# Deep Mutual Learning: our runs beside the paper",
        "",
        "Top-1, mAP and rank-1 in %, test split, final checkpoint; Δ = ours − paper in points "
        "(entropy in nats). Paper: Zhang et al., \"Deep Mutual Learning\", CVPR 2018; "
        "\"—\": no counterpart.",
        "",
    ]
    return "\n".join(intro + lines + ([""] + notes if notes else [])) + "\n"


def main(argv=None):
    """Command line: `python -m dml_tf.report [--link_base=DIR] RUN_DIR ...`; exit status."""
    from absl import flags
    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()  # Own flags: importing this module defines none.
    flags.DEFINE_string("link_base", ".", "Folder the plot links are relative to (where the "
                        "report is written).", flag_values=flag_values)
    flags.DEFINE_string("compare_as", None, "Set runs on an .npz subset beside the paper's numbers "
                        "for this dataset (e.g. cifar10 for the real CIFAR-10 subset).",
                        flag_values=flag_values)
    if any(a in ("-h", "--help", "-?") for a in argv[1:]):
        print(__doc__ + "\n" + flag_values.get_help())
        return 0
    try:
        run_dirs = flag_values(argv)[1:]
        # Progress on stderr: stdout is the report, usually redirected into report.md.
        progress = Progress(sys.stderr)
        sys.stdout.write(render(run_dirs, flag_values.link_base, flag_values.compare_as,
                                progress))
        progress("wrote the report to standard output")
    except (UserError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
