"""The command line: mistakes reported in one sentence before TensorFlow starts, --help as the
run script's manual, no TensorFlow start-up lines, honest progress in a log."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dml_tf import config, quiet_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs a run script with TensorFlow made unimportable: importing it (or Keras) raises.
WITHOUT_TENSORFLOW = """
import runpy, sys
sys.modules["tensorflow"] = None
script, *args = sys.argv[1:]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""
# Every C0 control character but the newline, and DEL: \r, \b, ESC (ANSI codes) among them.
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
ABSL_LOG_LINE = re.compile(r"^[IWEF]\d{4} ")


def _run(script, *args, tensorflow=True, env=None, timeout=120, cwd=ROOT):
    """Runs `script` from `cwd` (the repository root); returns (process, wall seconds)."""
    command = [sys.executable, os.path.join(ROOT, script), *args]
    if not tensorflow:
        command = [sys.executable, "-c", WITHOUT_TENSORFLOW, os.path.join(ROOT, script), *args]
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=environ | (env or {}))
    return proc, time.monotonic() - started


@pytest.mark.parametrize("args, flag", [
    (["--nets=resnet33"], "--nets"),
    (["--nets=tinyx0,tiny"], "--nets"),
    (["--learning_rate=nan"], "--learning_rate"),
    (["--weight_decay=inf"], "--weight_decay"),
    (["--momentum=nan"], "--momentum"),
    (["--seed=-1"], "--seed"),
    (["--net_args=name=x"], "--net_args"),
    (["--method=nope"], "--method"),
    (["--epochs=ten"], "--epochs"),
    (["--flagfile=flags/no_such.flags"], "--flagfile=flags/no_such.flags does not exist in the "
                                         f"working directory {ROOT}; give the file's path"),
    (["stray"], "stray"),
    (["--epochs=3", "--train_steps=10"], "--epochs=3 and --train_steps=10 both give the run's length"),
])
def test_a_bad_flag_is_one_sentence_exit_2_before_tensorflow(args, flag, tmp_path):
    proc, seconds = _run("run_cifar.py", *args, f"--model_dir={tmp_path / 'run'}",
                         tensorflow=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], proc.stderr
    assert proc.stdout == ""
    assert seconds < 10
    assert not (tmp_path / "run").exists()


def test_a_model_dir_that_is_a_file_is_refused_before_tensorflow(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    proc, seconds = _run("run_cifar.py", f"--model_dir={path}", tensorflow=False)
    assert proc.returncode == 2 and seconds < 10
    assert proc.stderr.startswith("error: --model_dir=") and len(proc.stderr.splitlines()) == 1
    assert path.read_text() == "not a folder"


@pytest.mark.parametrize("script, default", [
    ("run_cifar.py", "(default: 'sgd')"),
    ("run_market.py", "(default: 'adam')"),
    ("run_imagenet.py", "(default: 'rmsprop')"),
])
def test_help_is_the_scripts_grouped_flags_without_tensorflow(script, default):
    proc, seconds = _run(script, "--help", tensorflow=False)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for flag in ("--nets", "--method", "--learning_rate", "--data_dir", "--model_dir"):
        assert re.search(rf"^  {flag}: ", text, re.M), flag
    titles = [text.index(f"\n{title}:\n") for title in
              ("data", "cohort and method", "schedule", "run and reliability")]
    assert titles == sorted(titles)
    optimizer_help = text[text.index("  --optimizer:"):].split("\n  --", 1)[0]
    assert default in optimizer_help  # the script's own default
    assert "logtostderr" not in text  # absl's flags are --helpfull's
    assert seconds < 10


def test_help_in_a_flagfile_and_short_forms(tmp_path):
    flagfile = tmp_path / "help.flags"
    flagfile.write_text("--nets=tiny,tiny\n--help\n")
    for args in ([f"--flagfile={flagfile}"], ["-h"], ["-?"], ["--helpshort"]):
        proc, _ = _run("run_cifar.py", *args, tensorflow=False)
        assert proc.returncode == 0 and "--learning_rate" in proc.stdout, args


def test_helpfull_still_lists_every_flag():
    proc, _ = _run("run_cifar.py", "--helpfull", tensorflow=False)
    assert "--nets" in proc.stdout and "--[no]logtostderr" in proc.stdout


PRINTED = re.compile(r"^  (--\w+(?:=\S*| \(unset\)))\s+(.+)$")


def _printed(stdout):
    """--print_config's rows: {'--name=value' or '--name (unset)': origin}."""
    rows = [PRINTED.match(line) for line in stdout.splitlines() if line.startswith("  --")]
    assert all(rows), stdout
    return {row.group(1): row.group(2) for row in rows}


def _project(tmp_path):
    """Flagfiles that include a shared one by its path from the project root, as flags/ does,
    and a working directory outside the project."""
    base = tmp_path / "project" / "flags" / "base.flags"
    experiment = tmp_path / "project" / "flags" / "paper" / "exp.flags"
    experiment.parent.mkdir(parents=True)
    base.write_text("# shared schedule\n--learning_rate=0.05\n--batch_size=8\n\n// absl's other "
                    "comment\n--nonesterov\n")
    experiment.write_text("--flagfile=flags/base.flags\n--nets=tiny,tiny\n--batch_size=16\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return base, experiment, elsewhere


def test_print_config_gives_every_setting_its_value_and_origin_without_tensorflow(tmp_path):
    base, experiment, elsewhere = _project(tmp_path)
    model_dir = tmp_path / "run"
    proc, seconds = _run("run_cifar.py", f"--flagfile={experiment}", "--seed=4",
                         f"--model_dir={model_dir}", "--print_config", tensorflow=False,
                         cwd=elsewhere)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    rows = _printed(proc.stdout)
    assert rows["--learning_rate=0.05"] == f"flagfile {base}"  # nested, found from its includer
    assert rows["--nesterov=false"] == f"flagfile {base}"
    assert rows["--batch_size=16"] == f"flagfile {experiment}"  # the later line wins
    assert rows["--nets=tiny,tiny"] == f"flagfile {experiment}"
    assert rows["--seed=4"] == rows[f"--model_dir={model_dir}"] == "command line"
    assert rows["--optimizer=sgd"] == rows["--data_dir (unset)"] == "default"
    assert rows["--init=scratch"] == "default (not a flag of run_cifar.py)"
    names = {re.match(r"--(\w+)", shown).group(1) for shown in rows}
    assert names == {f.name for f in dataclasses.fields(config.Config)}
    assert not model_dir.exists() and os.listdir(elsewhere) == []
    assert seconds < 10


def test_print_config_of_the_paper_flagfiles_from_another_folder(tmp_path):
    proc, _ = _run("run_cifar.py", f"--flagfile={ROOT}/flags/cifar100/dml_resnet32_resnet32.flags",
                   "--print_config", tensorflow=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = _printed(proc.stdout)
    assert rows["--epochs=200"] == f"flagfile {ROOT}/flags/cifar_paper.flags"
    assert rows["--dataset=cifar100"] == f"flagfile {ROOT}/flags/cifar100/dml_resnet32_resnet32.flags"


def test_print_config_names_the_scripts_defaults_and_an_epochs_that_beats_its_budget():
    proc, _ = _run("run_market.py", "--epochs=1", "--print_config", tensorflow=False)
    assert proc.returncode == 0, proc.stderr
    rows = _printed(proc.stdout)
    assert rows["--epochs=1"] == "command line"
    assert rows["--train_steps (unset)"] == "run_market.py default 200000, yielding to --epochs"
    assert rows["--optimizer=adam"] == "run_market.py default"
    assert rows["--dataset=market1501"] == "set by run_market.py"


@pytest.mark.parametrize("content, words", [
    ("--flagfile=flags/missing.flags\n",
     r"^error: --flagfile=flags/missing.flags, named in .*exp.flags, exists neither from the "
     r"working directory nor from that file's folder or any folder above it; correct the path"),
    ("--flagfile=flags/paper/exp.flags\n",
     r"^error: .*exp.flags includes --flagfile=.*exp.flags, which is already being read"),
    ("--flagfile=flags\n", r"^error: --flagfile=.*flags is a folder; pass a file of flags\.$"),
])
def test_a_flagfile_that_cannot_be_read_is_one_sentence(tmp_path, content, words):
    _, experiment, elsewhere = _project(tmp_path)
    experiment.write_text(content)
    proc, _ = _run("run_cifar.py", f"--flagfile={experiment}", f"--model_dir={tmp_path / 'run'}",
                   tensorflow=False, cwd=elsewhere)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and re.match(words, proc.stderr), proc.stderr
    assert "ERROR::" not in proc.stderr and not (tmp_path / "run").exists()


def _teacher_run(folder, nets=("tiny", "tiny"), dataset="digits"):
    """A finished run's folder as the run scripts write it: flags.json, checkpoints/ckpt-N.*."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "flags.json").write_text(json.dumps({"dataset": dataset, "nets": list(nets),
                                                   "method": "independent"}, indent=2))
    (folder / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-4"\n')
    for suffix in (".index", ".data-00000-of-00001"):
        (folder / "checkpoints" / f"ckpt-4{suffix}").write_bytes(b"\0")
    return folder


@pytest.mark.parametrize("args, words", [
    ([], "--method=kd distils from a fixed teacher: pass --teacher_checkpoint at the teacher"),
    (["--teacher_checkpoint={tmp}/nowhere"], "nowhere does not exist"),
    (["--teacher_checkpoint={tmp}"], "holds no flags.json"),
    (["--teacher_checkpoint={tmp}/teacher", "--teacher_peer=3"],
     "--teacher_peer=3 is beyond the 2 peers of the teacher run"),
    (["--teacher_checkpoint={tmp}/teacher", "--nets=resnet32,tiny"],
     "holds peer1 = tiny, but this run's teacher (peer 1, the first of --nets) is resnet32"),
    (["--teacher_checkpoint={tmp}/teacher", "--dataset=cifar10"],
     "trained on --dataset=digits, not on this run's cifar10"),
])
def test_a_refused_kd_run_stops_before_tensorflow_and_leaves_nothing(tmp_path, args, words):
    _teacher_run(tmp_path / "teacher")
    model_dir = tmp_path / "runs" / "kd"
    proc, seconds = _run("run_cifar.py", "--dataset=digits", "--nets=tiny,tiny", "--method=kd",
                         *(arg.format(tmp=tmp_path) for arg in args), f"--model_dir={model_dir}",
                         tensorflow=False)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists() and seconds < 10


def test_an_error_found_after_tensorflow_starts_is_the_first_line(tmp_path):
    # dml needs two peers: checked against the method's class, after TensorFlow's import.
    proc, _ = _run("run_cifar.py", "--nets=tiny", f"--model_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    lines = (proc.stderr + proc.stdout).splitlines()
    assert lines[0].startswith("error: --method=dml needs at least 2 networks in --nets")
    assert len(lines) == 1, lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("line, level, kept", [
    (b"I0000 00:00:1796105569.893064    4851 cudart_stub.cc:31] Could not find cuda\n", 1, False),
    (b"I0000 00:00:1796105569.893064    4851 cudart_stub.cc:31] Could not find cuda\n", 0, True),
    (b"W0000 00:00:1796105569.893064    4851 some.cc:3] a warning\n", 1, True),
    (b"W1201 06:12:00.123456    4851 some.cc:3] a warning\n", 2, False),
    (b"E0000 00:00:1796105576.119029    4851 cuda_platform.cc:52] failed call to cuInit\n", 2, True),
    (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
     1, False),
    (b"Traceback (most recent call last):\n", 3, True),
    (b"I am a line of the program, not a log line\n", 3, True),
])
def test_keep_line_applies_the_log_level_to_absl_lines_only(line, level, kept):
    assert quiet_start.keep_line(line, level) is kept


def test_filtered_stderr_drops_lines_below_the_level_at_the_file_descriptor():
    code = """
import os, sys
from dml_tf import quiet_start
with quiet_start.filtered_stderr(1):
    os.write(2, b"I0000 00:00:12.5  7 a.cc:1] info\\nW0000 00:00:12.5  7 a.cc:2] warn\\n")
    print("from python", file=sys.stderr)
os.write(2, b"I0000 00:00:12.5  7 a.cc:3] after the block\\n")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.stderr.splitlines() == [
        "W0000 00:00:12.5  7 a.cc:2] warn", "from python", "I0000 00:00:12.5  7 a.cc:3] after the block"]


def test_environment_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setattr(quiet_start, "has_accelerator", lambda: False)
    environ = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": "0"}
    quiet_start.configure_environment(environ)
    assert environ == {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": "0",
                       "TF_ENABLED_DEVICE_TYPES": "CPU"}
    environ = {"CUDA_VISIBLE_DEVICES": "1"}
    quiet_start.configure_environment(environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "1", "TF_CPP_MIN_LOG_LEVEL": "1",
                       "TF_ENABLE_ONEDNN_OPTS": "1"}
    monkeypatch.setattr(quiet_start, "has_accelerator", lambda: True)
    environ = {}
    quiet_start.configure_environment(environ)
    # a GPU machine keeps its GPU platform
    assert environ == {"TF_CPP_MIN_LOG_LEVEL": "1", "TF_ENABLE_ONEDNN_OPTS": "1"}
    assert [quiet_start.min_log_level({"TF_CPP_MIN_LOG_LEVEL": v}) for v in ("2", "", "x")] == \
        [2, 0, 0]


def test_quiet_import_is_silent_unless_the_user_asks_for_info():
    code = "from dml_tf import quiet_start; quiet_start.quiet(); import tensorflow as tf; tf.ones([1]) + 1"
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if quiet_start.has_accelerator():
        pytest.skip("the CPU-only start-up lines are what this test is about")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=ROOT, timeout=120, env=environ)
    assert quiet.returncode == 0 and quiet.stderr == ""
    chatty = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, env=environ | {"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert any(ABSL_LOG_LINE.match(line) for line in chatty.stderr.splitlines())


def _tiny_npz(path, num_train=48):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (num_train, 16, 16, 3), dtype=np.uint8),
             y_train=np.arange(num_train) % 4,
             x_test=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), y_test=np.arange(12) % 4)
    return path


def test_sigint_checkpoints_and_exits_130(tmp_path):
    data = _tiny_npz(tmp_path / "data.npz", num_train=4000)
    model_dir = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "run_cifar.py"), "--dataset=npz",
               f"--data_dir={data}", "--nets=tiny,tiny", "--batch_size=8", "--export=false",
               f"--model_dir={model_dir}"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first_line = proc.stdout.readline()  # a tenth of the 500-step epoch is done
        assert first_line.startswith("Epoch 1/200 step 50/500"), first_line
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "SIGINT" in stderr and "resume" in stderr
    assert (model_dir / "checkpoints").is_dir()


def test_a_run_in_a_log_shows_plain_lines_with_the_epochs_means(tmp_path):
    data = _tiny_npz(tmp_path / "data.npz")
    model_dir = tmp_path / "run"
    proc, _ = _run("run_cifar.py", "--dataset=npz", f"--data_dir={data}", "--nets=tiny,tiny",
                   "--epochs=2", "--steps_per_epoch=3", "--batch_size=8", "--export=false",
                   "--learning_rate=0.05", f"--model_dir={model_dir}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not CONTROL.search(proc.stdout) and not CONTROL.search(proc.stderr)
    assert not any(ABSL_LOG_LINE.match(line) for line in proc.stderr.splitlines()), proc.stderr
    last = [line for line in proc.stdout.splitlines() if line.startswith("Epoch 2/2 step 3/3")]
    assert len(last) == 1, proc.stdout
    results = json.loads((model_dir / "results.json").read_text())
    for k in (1, 2):
        for shown, key in (("loss", "loss"), ("acc", "top1")):
            printed = re.search(rf"p{k}_{shown}: (-?\d+\.\d{{4}})", last[0]).group(1)
            assert printed == f"{results[f'train/peer{k}/{key}']:.4f}"
