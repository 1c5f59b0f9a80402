"""The report's table on fake run folders (flags.json + results.json), and its paper lookup."""

import json

import pytest

from dml_tf import paper_numbers, report


def _write_run(root, name, flags, results=None, analysis=None, plots=(), checkpoints=()):
    """A run folder; `checkpoints` are the numbers of the checkpoint files it holds (the report
    reads their names only)."""
    folder = root / name
    folder.mkdir()
    (folder / "flags.json").write_text(json.dumps(flags))
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    if analysis is not None:
        (folder / "analysis.json").write_text(json.dumps(analysis))
    for plot in plots:
        (folder / plot).write_bytes(b"\x89PNG\r\n\x1a\n")
    if checkpoints:
        (folder / "checkpoints").mkdir()
    for number in checkpoints:
        for suffix in ("index", "data-00000-of-00001"):
            (folder / "checkpoints" / f"ckpt-{number}.{suffix}").write_bytes(b"")
    return folder


def _analysed(name, epoch=5, step_in_epoch=0, finished=True, entropy=(1.5, 1.8), plots=None):
    """An analysis.json of checkpoint `name` (as dml_tf.analysis writes it)."""
    number = int(name.split("-")[1])
    return {"checkpoint": {"name": name, "step": number, "epoch": epoch,
                           "step_in_epoch": step_in_epoch, "closed": step_in_epoch == 0,
                           "finished": finished},
            "peers": {f"peer{k}": {"entropy": e} for k, e in enumerate(entropy, start=1)},
            "plots": plots or {}}


def _table(markdown):
    """{run name: {column title: cell}}; a "paper"/"Δ" column is keyed "<title> paper"/"<title> Δ"."""
    lines = [l for l in markdown.splitlines() if l.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    keys, group = [], None
    for title in header:
        if title in ("paper", "Δ"):
            keys.append(f"{group} {title}")
        else:
            group = title
            keys.append(title)
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = dict(zip(keys, cells))
    return rows


def _cifar(method, nets, dataset="cifar100", **extra):
    return {"dataset": dataset, "nets": list(nets), "method": method, "method_args": [], **extra}


def test_paper_lookup():
    metrics, sources = paper_numbers.lookup("cifar100", ("resnet32", "resnet32"), "dml")
    assert (metrics["test/peer1/top1"], metrics["test/peer2/top1"]) == (71.19, 70.75)
    assert sources["test/peer1/top1"] == "Table 2"
    # The pair in the other order: the peers' numbers swap with them.
    swapped, _ = paper_numbers.lookup("cifar100", ("resnet32", "wrn28_10"), "dml")
    assert (swapped["test/peer1/top1"], swapped["test/peer2/top1"]) == (70.73, 78.96)
    # Independent nets: per network, whatever the cohort.
    alone, _ = paper_numbers.lookup("cifar10", ("mobilenet",), "independent")
    assert alone == {"test/peer1/top1": 93.59}
    kd, kd_sources = paper_numbers.lookup("market1501", ("inception_v1", "mobilenet"), "kd")
    assert kd == {"test/peer1/mAP": 63.91, "test/peer2/mAP": 52.30}
    assert kd_sources["test/peer2/mAP"] == "Table 4"
    # Tables 3 and 4 both describe the MobileNet pair: per-net mAP (4), mean mAP (3).
    pair, pair_sources = paper_numbers.lookup("market1501", ("mobilenet", "mobilenet"), "dml")
    assert pair["test/peer1/mAP"] == 55.28 and pair["test/mean/mAP"] == 54.71
    assert pair_sources["test/mean/rank1"] == "Table 3"
    pre, _ = paper_numbers.lookup("market1501", ("mobilenet", "mobilenet"), "dml", pretrained=True)
    assert pre["test/mean/mAP"] == 70.51 and pre["test/mean/mq_rank1"] == 92.81
    assert paper_numbers.lookup("market1501", ("mobilenet", "mobilenet"), "entropy_reg")[0] == {
        "test/mean/mAP": 50.94, "test/mean/rank1": 76.34}
    assert paper_numbers.lookup("cifar100", ("resnet32", "resnet32"), "kd") is None
    assert paper_numbers.lookup("digits", ("tiny", "tiny"), "dml") is None
    assert paper_numbers.train_entropy("cifar100", "resnet32", "dml") == 1.7099


def test_cifar_rows_compare_with_table_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = [
        _write_run(tmp_path, "dml_r32", _cifar("dml", ["resnet32", "resnet32"]),
                   {"test/peer1/top1": 0.72, "test/peer2/top1": 0.7, "test/ensemble/top1": 0.7345},
                   analysis=_analysed("ckpt-80", plots={"noise": "analysis_noise.png",
                                                        "top5": "analysis_top5.png",
                                                        "tsne": "analysis_tsne.png"}),
                   plots=["analysis_noise.png", "analysis_top5.png"], checkpoints=(40, 80)),
        _write_run(tmp_path, "ind_c10", _cifar("independent", ["resnet32"], dataset="cifar10"),
                   {"test/peer1/top1": 0.9, "test/ensemble/top1": 0.9}),
        _write_run(tmp_path, "digits", _cifar("dml", ["tiny", "tiny"], dataset="digits"),
                   {"test/peer1/top1": 0.95, "test/peer2/top1": 0.96, "test/ensemble/top1": 0.97}),
    ]
    markdown = report.render([str(r) for r in runs])
    rows = _table(markdown)
    dml = rows["dml_r32"]
    assert (dml["method"], dml["nets"], dml["dataset"]) == ("dml", "resnet32, resnet32", "cifar100")
    assert dml["top-1 % (peers)"] == "72.00 / 70.00"
    assert dml["top-1 % (peers) paper"] == "71.19 / 70.75"
    assert dml["top-1 % (peers) Δ"] == "+0.81 / -0.75"
    assert dml["ensemble top-1 %"] == "73.45"
    assert dml["train entropy (nats)"] == "1.5000 / 1.8000"
    assert dml["train entropy (nats) paper"] == "1.7099 / 1.7099"
    assert dml["paper source"] == "Sec. 4.8, Table 2"
    # Links to the plots that exist, relative to the current directory; t-SNE is missing.
    assert dml["analysis plots"] == ("[noise](dml_r32/analysis_noise.png) "
                                     "[top-5](dml_r32/analysis_top5.png)")
    ind = rows["ind_c10"]
    assert (ind["top-1 % (peers)"], ind["top-1 % (peers) paper"]) == ("90.00", "92.47")
    assert ind["top-1 % (peers) Δ"] == "-2.47"
    digits = rows["digits"]
    assert digits["top-1 % (peers) paper"] == "— / —" and digits["top-1 % (peers) Δ"] == "— / —"
    assert digits["paper source"] == "—" and digits["analysis plots"] == "—"
    assert not any("mAP" in column for column in dml)  # No retrieval metrics: no such columns.


def test_market_rows_compare_with_tables_3_4_5(tmp_path):
    reid = {"test/peer1/mAP": 0.5, "test/peer2/mAP": 0.51, "test/mean/mAP": 0.505,
            "test/mean/rank1": 0.78, "test/peer1/rank1": 0.77, "test/peer2/rank1": 0.79}
    market = dict(dataset="market1501", nets=["mobilenet", "mobilenet"], method_args=[])
    runs = [
        _write_run(tmp_path, "kd", {**market, "method": "kd",
                                    "method_args": [["temperature", 1.0]]}, reid),
        _write_run(tmp_path, "dml_pre", {**market, "method": "dml", "init": "imagenet"}, reid),
        _write_run(tmp_path, "entropy", {**market, "method": "entropy_reg"}, reid),
        _write_run(tmp_path, "running", {**market, "method": "dml_l2"}),
    ]
    rows = _table(report.render([str(r) for r in runs], link_base=str(tmp_path)))
    kd = rows["kd"]
    assert kd["method"] == "kd (temperature=1.0)"
    assert (kd["mAP % (peers)"], kd["mAP % (peers) paper"]) == ("50.00 / 51.00", "50.15 / 50.07")
    assert kd["mAP % (peers) Δ"] == "-0.15 / +0.93"
    assert kd["mean mAP % paper"] == "—" and kd["paper source"] == "Table 4"
    pre = rows["dml_pre"]
    assert pre["dataset"] == "market1501 (pretrained)"
    assert (pre["mean mAP %"], pre["mean mAP % paper"], pre["mean mAP % Δ"]) == (
        "50.50", "70.51", "-20.01")
    assert pre["mean rank-1 % paper"] == "89.34" and pre["mAP % (peers) paper"] == "— / —"
    entropy = rows["entropy"]
    assert entropy["mean rank-1 % paper"] == "76.34" and entropy["mean rank-1 % Δ"] == "+1.66"
    running = rows["running"]
    assert running["mean mAP %"] == "—" and running["mean mAP % paper"] == "51.01"
    assert "top-1 % (peers)" not in kd


def test_command_line(tmp_path, capsys):
    run = _write_run(tmp_path, "dml", _cifar("dml", ["resnet32", "resnet32"]),
                     {"test/peer1/top1": 0.7119, "test/peer2/top1": 0.7075})
    assert report.main(["report", str(run)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith("# ") and "| dml | dml | resnet32, resnet32 | cifar100 |" in out
    assert "+0.00 / +0.00" in out
    assert "[" not in out.splitlines()[0] and " s] " not in out  # progress stays off the report
    lines = captured.err.splitlines()
    assert len(lines) == 2 and "\r" not in captured.err and "\x1b" not in captured.err
    assert lines[0].endswith(f"] run 1/1 {run}: flags.json, results.json")
    assert lines[1].endswith("] wrote the report to standard output")
    assert report.main(["report", str(tmp_path / "nothing")]) == 2
    assert "flags.json" in capsys.readouterr().err
    assert report.main(["report"]) == 2
    assert "run folder" in capsys.readouterr().err


def test_percent_values_are_not_scaled_twice():
    assert report.as_percent(0.7119) == pytest.approx(71.19)
    assert report.as_percent(54.71) == 54.71
    assert report.as_percent(None) is None


def test_subset_runs_can_be_compared_with_a_paper_dataset(tmp_path):
    import json
    from dml_tf import report
    run = tmp_path / "dml_subset"
    run.mkdir()
    (run / "flags.json").write_text(json.dumps({"dataset": "npz", "nets": ["resnet32", "resnet32"],
                                                "method": "dml", "init": "scratch"}))
    (run / "results.json").write_text(json.dumps({"test/peer1/top1": 0.5, "test/peer2/top1": 0.4,
                                                  "test/ensemble/top1": 0.55}))
    plain = report.render([str(run)])
    assert "92.68" not in plain
    compared = report.render([str(run)], compare_as="cifar10")
    # Paper Table 2, CIFAR-10 ResNet-32 pair with DML: 92.68 / 92.80; ours 50.00 / 40.00.
    assert "92.68" in compared and "92.80" in compared and "npz subset, vs paper cifar10" in compared
    assert "-42.68" in compared or "−42.68" in compared


def _stale_runs(root):
    """A run analysed at its final checkpoint, and runs whose analysis is of another one."""
    flags = _cifar("dml", ["resnet32", "resnet32"])
    results = {"test/peer1/top1": 0.72, "test/peer2/top1": 0.7}
    plots = {"entropy": "analysis_entropy.png"}
    return [
        _write_run(root, "final", flags, results, _analysed("ckpt-80"), checkpoints=(40, 80)),
        # Analysed (with --allow_unfinished) while it trained; it has finished since.
        _write_run(root, "midway", flags, results,
                   _analysed("ckpt-33", epoch=2, step_in_epoch=7, finished=False,
                             entropy=(0.5, 0.6), plots=plots),
                   plots=["analysis_entropy.png"], checkpoints=(40, 80)),
        # Analysed when finished at ckpt-80, then trained on (--epochs raised) to ckpt-120.
        _write_run(root, "extended", flags, results, _analysed("ckpt-80"), checkpoints=(80, 120)),
        _write_run(root, "unrecorded", flags, results, {"peers": {"peer1": {"entropy": 1.0}}},
                   checkpoints=(80,)),
        _write_run(root, "no_checkpoints", flags, results, _analysed("ckpt-80")),
        _write_run(root, "training", flags, None,
                   _analysed("ckpt-33", epoch=2, step_in_epoch=7, finished=False),
                   checkpoints=(33,)),
    ]


def test_an_analysis_of_another_checkpoint_is_never_set_beside_the_results(tmp_path):
    runs = _stale_runs(tmp_path)
    markdown = report.render([str(r) for r in runs])
    rows = _table(markdown)
    assert rows["final"]["train entropy (nats)"] == "1.5000 / 1.8000"
    for name in ("midway", "extended", "unrecorded", "no_checkpoints", "training"):
        assert rows[name]["train entropy (nats)"] == "— / —", name
        assert rows[name]["analysis plots"] == "—", name
    notes = [line for line in markdown.splitlines() if line.startswith("- ")]
    rerun = "rerun python -m dml_tf.analysis --model_dir="
    assert notes == [
        f"- midway: its analysis.json is of ckpt-33, epoch 3 at step 7, but "
        f"the run had not finished then: its entropy (0.5000 / 0.6000 nats) is left out of the "
        f"table; {rerun}{runs[1]}.",
        f"- extended: its analysis.json is of ckpt-80, after epoch 5, but results.json is from "
        f"ckpt-120, the run's final checkpoint: its entropy (1.5000 / 1.8000 nats) is left out "
        f"of the table; {rerun}{runs[2]}.",
        f"- unrecorded: its analysis.json does not say which checkpoint it analysed (an older "
        f"analysis), so its numbers are left out of the table; {rerun}{runs[3]}.",
        f"- no_checkpoints: its analysis.json is of ckpt-80, after epoch 5, but checkpoints/ is "
        f"gone, so which checkpoint results.json is from cannot be told: its entropy "
        f"(1.5000 / 1.8000 nats) is left out of the table; {rerun}{runs[4]}.",
        "- training: no results.json yet (training unfinished).",
        f"- training: its analysis.json is of ckpt-33, epoch 3 at step 7, but "
        f"there is no results.json to set it beside: its entropy (1.5000 / 1.8000 nats) is left "
        f"out of the table; {rerun}{runs[5]}.",
    ]


def test_values_that_are_not_finite_are_marked(tmp_path):
    run = _write_run(tmp_path, "diverged", _cifar("dml", ["resnet32", "resnet32"]),
                     checkpoints=(80,))
    # What json.dump writes for float("nan") and float("inf"): NaN, Infinity.
    (run / "results.json").write_text('{"test/peer1/top1": NaN, "test/peer2/top1": Infinity, '
                                      '"test/ensemble/top1": 0.5}')
    (run / "analysis.json").write_text(json.dumps(_analysed("ckpt-80", entropy=(0.2, 1.0)))
                                       .replace("0.2", "NaN"))
    row = _table(report.render([str(run)]))["diverged"]
    assert row["top-1 % (peers)"] == "nan (diverged) / inf (diverged)"
    assert row["top-1 % (peers) Δ"] == "— / —" and row["top-1 % (peers) paper"] == "71.19 / 70.75"
    assert row["ensemble top-1 %"] == "50.00"
    assert row["train entropy (nats)"] == "nan (diverged) / 1.0000"
    assert row["train entropy (nats) Δ"] == "— / -0.7099"


MALFORMED = {
    "results.json is a list": ("results.json", "[0.7, 0.71]",
                               "{f} holds a list, not a run's metrics (a JSON object); rerun the "
                               "run's evaluation or delete the file."),
    "results.json holds a string": ("results.json", '{"test/peer1/top1": "71%"}',
                                    '{f}: "test/peer1/top1" is a string, not a number; rerun the '
                                    "run's evaluation or delete the file."),
    "results.json holds an object": ("results.json", '{"test/ensemble/top1": {"value": 0.7}}',
                                     '{f}: "test/ensemble/top1" is an object, not a number; rerun '
                                     "the run's evaluation or delete the file."),
    "flags.json is a list": ("flags.json", '["--dataset=cifar100"]',
                             "{f} holds a list, not a run's flags (a JSON object); restore the "
                             "run's flags.json."),
    "flags.json nets is a string": ("flags.json", '{"dataset": "cifar100", "nets": "resnet32"}',
                                    '{f}: "nets" is "resnet32", not a list of network names; '
                                    "restore the run's flags.json."),
    "analysis.json is a string": ("analysis.json", '"done"',
                                  "{f} holds a string, not an analysis (a JSON object); rerun "
                                  "python -m dml_tf.analysis or delete the file."),
    "analysis.json entropy is a list": ("analysis.json", '{"peers": {"peer1": {"entropy": [1]}}}',
                                        '{f}: "entropy" is a list, not a number; rerun python -m '
                                        "dml_tf.analysis or delete the file."),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_file_is_one_sentence_naming_it(tmp_path, capsys, case):
    name, text, expected = MALFORMED[case]
    run = _write_run(tmp_path, "run", _cifar("dml", ["resnet32", "resnet32"]),
                     {"test/peer1/top1": 0.7, "test/peer2/top1": 0.7})
    (run / name).write_text(text)
    assert report.main(["report", str(run)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: " + expected.format(f=run / name)
