"""Run scripts: every flagfile parses into a valid config; user errors exit 2 in one sentence."""

import glob
import os
import subprocess
import sys

import pytest
from absl import flags

import run_cifar
import run_imagenet
import run_market
from dml_tf import config, methods
from dml_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "flags", "**", "*.flags"), recursive=True))


def _parse(*args, script=run_cifar):
    """Parses args into fresh FlagValues with the script's flags; returns the script's config,
    checked as the command line checks it (also against the method's and networks' modules)."""
    flag_values = flags.FlagValues()
    script.define_flags(flag_values)
    flag_values([f"{script.__name__}.py", *args])
    return config.check_against_library(script.make_config(flag_values))


@pytest.fixture(autouse=True)
def _from_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # flagfiles include shared flagfiles relative to the root


def test_there_is_a_flagfile_per_table2_cell():
    names = {os.path.relpath(p, os.path.join(ROOT, "flags")) for p in FLAGFILES}
    pairs = ["resnet32_resnet32", "wrn28_10_resnet32", "mobilenet_resnet32",
             "mobilenet_mobilenet", "wrn28_10_mobilenet", "wrn28_10_wrn28_10"]
    for dataset in ("cifar10", "cifar100"):
        for method in ("independent", "dml"):
            for pair in pairs:
                assert f"{dataset}/{method}_{pair}.flags" in names
    assert "quickstart.flags" in names


@pytest.mark.parametrize("path", FLAGFILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_flagfile_parses(path):
    script = (run_market if "market1501" in os.path.relpath(path, ROOT) else
              run_imagenet if "/imagenet/" in path else run_cifar)
    cfg = _parse(f"--flagfile={os.path.relpath(path, ROOT)}", script=script)
    assert len(cfg.nets) >= 1
    if cfg.method == "kd":
        assert cfg.teacher_checkpoint
    if cfg.semi_supervised != "none":
        assert cfg.labelled_fraction < 1.0 or cfg.labelled_ids or path.endswith("_100.flags")
    relative = os.path.relpath(path, os.path.join(ROOT, "flags")).split("/")
    if script is run_market:
        # The released code's setting (docs/methods.md).
        assert cfg.dataset == "market1501" and cfg.optimizer == "adam"
        assert (cfg.learning_rate, cfg.adam_beta1, cfg.adam_beta2, cfg.epsilon) == (2e-4, 0.5, 0.999, 1e-8)
        assert (cfg.batch_size, cfg.weight_decay) == (16, 4e-5)
        assert dict(cfg.method_args)["label_smoothing"] == 0.1
        assert "mobilenet" in cfg.nets and cfg.image_size == (224, 224)
    elif "/imagenet/" in path:
        assert cfg.dataset == "imagenet" and cfg.image_size == (224, 224)
        if "mobilenet_mobilenet" in path or "inception" in path:
            # The paper's ImageNet setting (Sec. 4.1).
            assert (cfg.optimizer, cfg.rmsprop_decay, cfg.learning_rate) == ("rmsprop", 0.9, 0.1)
            assert (cfg.lr_decay_rate, cfg.lr_decay_epochs, cfg.batch_size) == (0.16, 20, 64)
    elif len(relative) == 2 and relative[0] in ("cifar10", "cifar100"):
        dataset, name = relative
        name = name[:-len(".flags")]
        method = max((m for m in methods.NAMES if name.startswith(m + "_")), key=len)
        assert cfg.dataset == dataset and cfg.method == method
        assert "_".join(cfg.nets) == name[len(method) + 1:]
        # The paper's schedule (Sec. 4.1).
        assert (cfg.optimizer, cfg.learning_rate, cfg.momentum, cfg.nesterov) == ("sgd", 0.1, 0.9, True)
        assert (cfg.lr_decay_rate, cfg.lr_decay_epochs, cfg.epochs, cfg.batch_size) == (0.1, 60, 200, 64)
        assert cfg.weight_decay == 5e-4 and cfg.update == "sequential"


def test_nets_shorthand_and_keyword_args():
    cfg = _parse("--nets=resnet32x3", "--method_args=label_smoothing=0.1", "--net_args=shortcut=B")
    assert cfg.nets == ("resnet32", "resnet32", "resnet32")
    assert cfg.method_args == (("label_smoothing", 0.1),)
    assert cfg.net_args == (("shortcut", "B"),)
    assert _parse("--nets=mobilenet,resnet32").nets == ("mobilenet", "resnet32")


@pytest.mark.parametrize("args, flag", [
    (["--nets=resnet33,resnet32"], "--nets"),
    (["--nets=resnet32"], "--nets"),  # dml needs two
    (["--epochs=0"], "--epochs"),
    (["--learning_rate=-0.1"], "--learning_rate"),
    (["--method_args=oops"], "--method_args"),
    (["--method_args=temperature=2"], "--method_args"),
])
def test_bad_flags_are_user_errors(args, flag):
    with pytest.raises(UserError, match=flag):
        _parse(*args)


def test_cli_user_error_exits_2_with_one_sentence(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run_cifar.py"), "--nets=resnet32,nope",
         f"--model_dir={tmp_path}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1 and "--nets" in error_lines[0] and "nope" in error_lines[0]
