"""config: every flag value no run can use is one UserError naming the flag; the module and the
registries it reads import no TensorFlow."""

import dataclasses
import subprocess
import sys

import pytest
from absl import flags

import run_cifar
import run_market
from dml_tf import config
from dml_tf.errors import UserError

FLOAT_FLAGS = [f.name for f in dataclasses.fields(config.Config) if isinstance(f.default, float)]


def _config(*args):
    """The Config of run_cifar.py's command line `args`, before the library checks."""
    flag_values = flags.FlagValues()
    run_cifar.define_flags(flag_values)
    flag_values(["run_cifar.py", *args])
    return run_cifar.make_config(flag_values)


def _checked(*args):
    return config.check_against_library(_config(*args))


def test_config_cli_and_registries_import_no_tensorflow():
    code = ("import sys; import run_cifar, run_market, run_imagenet; "
            "from dml_tf import cli, config, methods, nets, progress, quiet_start; "
            "methods.NAMES, nets.NAMES; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=run_cifar.__file__.rsplit("/", 1)[0])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("name", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_must_be_finite(name, value):
    with pytest.raises(UserError, match=f"^--{name} must be a finite number"):
        _config(f"--{name}={value}")


@pytest.mark.parametrize("args, message", [
    (["--seed=-1"], "^--seed must be 0 or positive"),
    (["--teacher_peer=0"], "^--teacher_peer must be positive"),
    (["--nets=tinyx0,tiny"], "^--nets names 'tinyx0', zero tiny peers"),
    (["--nets=tiny,,tiny"], "^--nets names '', which is not a network"),
    (["--net_args=name=x"], "^--net_args sets 'name', which the cohort sets"),
    (["--net_args=dropout"], "^--net_args='dropout' is not of the form"),
    (["--epochs=10", "--warmup_epochs=10"], "^--warmup_epochs=10 is not shorter than --epochs=10"),
    (["--epochs=10", "--warmup_epochs=100"], "^--warmup_epochs=100 is not shorter than --epochs=10"),
])
def test_values_refused_without_the_library(args, message):
    with pytest.raises(UserError, match=message):
        _config(*args)


def test_a_warm_up_shorter_than_the_run_is_accepted():
    assert _config("--epochs=10", "--warmup_epochs=9.5").warmup_epochs == 9.5


def test_nets_repeat_counts():
    assert _config("--nets=tinyx2,resnet32x1").nets == ("tiny", "tiny", "resnet32")


@pytest.mark.parametrize("args, message", [
    (["--nets=tiny"], r"^--method=dml needs at least 2 networks in --nets, got 1"),
    (["--nets=tiny,tiny", "--method=kd", "--teacher_checkpoint=x", "--nets=tiny"],
     r"^--method=kd needs at least 2 networks"),
    (["--method_args=label_smoothing=abc"], r"^--method_args label_smoothing=abc must be a number"),
    (["--method_args=label_smoothing=true"], r"^--method_args label_smoothing=True must be a number"),
    (["--method_args=temperature=2"], r"^--method_args names temperature, which --method=dml"),
    (["--method=kd", "--method_args=temperature=-1"],
     r"^--method_args=temperature=-1 is refused: .*temperature"),
    (["--method_args=label_smoothing=1.5"], r"^--method_args=label_smoothing=1.5 is refused"),
    (["--nets=tiny,tiny", "--net_args=dropout=0.3"], r"^--net_args sets dropout, which --nets' tiny"),
    (["--nets=wrn28_10,tiny", "--net_args=dropout=0.3"], r"which --nets' tiny does not take"),
])
def test_values_refused_against_the_method_and_networks(args, message):
    with pytest.raises(UserError, match=message):
        _checked(*args)


def test_accepted_library_arguments_pass():
    cfg = _checked("--nets=wrn28_10,wrn28_10", "--net_args=dropout=0.3",
                   "--method=kd", "--teacher_checkpoint=somewhere",
                   "--method_args=temperature=4,label_smoothing=0.1")
    assert cfg.net_args == (("dropout", 0.3),)
    assert dict(cfg.method_args) == {"temperature": 4, "label_smoothing": 0.1}


def _market(*args):
    flag_values = flags.FlagValues()
    run_market.define_flags(flag_values)
    flag_values(["run_market.py", *args])
    return run_market.make_config(flag_values)


def test_an_explicit_epochs_beats_the_scripts_default_step_budget(tmp_path):
    assert (_market().epochs, _market().train_steps) == (200, 200000)  # the released code's
    assert (_market("--epochs=1").epochs, _market("--epochs=1").train_steps) == (1, None)
    assert _market("--train_steps=50").train_steps == 50
    flagfile = tmp_path / "budget.flags"
    flagfile.write_text("--train_steps=300\n")
    with pytest.raises(UserError, match=r"^--epochs=2 and --train_steps=300 both give the run's "
                                        r"length .*add --train_steps=0 to train for --epochs\.$"):
        _market(f"--flagfile={flagfile}", "--epochs=2")
    cfg = _market(f"--flagfile={flagfile}", "--epochs=2", "--train_steps=0")
    assert (cfg.epochs, cfg.train_steps) == (2, None)
    assert _config("--train_steps=0").train_steps is None  # 0: no budget, as unset
