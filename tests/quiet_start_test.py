"""A quiet start only when asked: dml_tf.quiet(), DML_TF_QUIET=1, and GPUs the user hid."""

import fnmatch
import os
import platform
import subprocess
import sys

import pytest

from dml_tf import quiet_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TF_VARIABLES = ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLED_DEVICE_TYPES", "CUDA_VISIBLE_DEVICES",
                 "HIP_VISIBLE_DEVICES", "DML_TF_QUIET", "TF_ENABLE_ONEDNN_OPTS")


def _on_machine_with(monkeypatch, *nodes):
    """Pretends that exactly these device nodes exist."""
    monkeypatch.setattr(quiet_start.glob, "glob",
                        lambda pattern: [n for n in nodes if fnmatch.fnmatch(n, pattern)])


@pytest.mark.parametrize("nodes, environ, cpu_only", [
    (["/dev/nvidia0"], {"CUDA_VISIBLE_DEVICES": "-1"}, True),
    (["/dev/nvidia0"], {"CUDA_VISIBLE_DEVICES": ""}, True),
    (["/dev/nvidia0"], {"CUDA_VISIBLE_DEVICES": " -1 "}, True),
    ([], {"CUDA_VISIBLE_DEVICES": "-1"}, True),
    (["/dev/nvidia0"], {"CUDA_VISIBLE_DEVICES": "0"}, False),
    (["/dev/nvidia0"], {"CUDA_VISIBLE_DEVICES": "-1,0"}, False),  # not a "hide all" value
    (["/dev/nvidia0", "/dev/accel0"], {"CUDA_VISIBLE_DEVICES": "-1"}, False),  # a TPU is left
    (["/dev/kfd"], {"CUDA_VISIBLE_DEVICES": "-1"}, False),  # the ROCm GPU is still visible
    (["/dev/kfd"], {"CUDA_VISIBLE_DEVICES": "-1", "HIP_VISIBLE_DEVICES": "-1"}, True),
    (["/dev/nvidia0"], {"HIP_VISIBLE_DEVICES": "-1"}, False),  # hides ROCm, not CUDA
    (["/dev/nvidia0"], {}, False),
    ([], {}, True),
])
def test_cpu_only_where_no_gpu_is_visible_or_present(monkeypatch, nodes, environ, cpu_only):
    _on_machine_with(monkeypatch, *nodes)
    quiet_start.configure_environment(environ)
    assert environ.get("TF_ENABLED_DEVICE_TYPES") == ("CPU" if cpu_only else None)
    assert environ["TF_CPP_MIN_LOG_LEVEL"] == "1"


def test_the_users_device_choice_is_kept(monkeypatch):
    _on_machine_with(monkeypatch)
    environ = {"CUDA_VISIBLE_DEVICES": "-1", "TF_ENABLED_DEVICE_TYPES": "CPU,GPU",
               "TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": "0"}
    quiet_start.configure_environment(environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "-1", "TF_ENABLED_DEVICE_TYPES": "CPU,GPU",
                       "TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": "0"}


def _python(code, **environ):
    """Runs `code` in a fresh interpreter with only `environ` among TensorFlow's variables."""
    env = {k: v for k, v in os.environ.items() if k not in _TF_VARIABLES} | environ
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


_FIRST_OP = "import tensorflow as tf; tf.ones([1]) + 1"


def test_hidden_gpus_start_without_the_cuinit_line():
    # The machine without a TPU is what the rule is about; a GPU machine is fine (hidden).
    if quiet_start._exists(quiet_start._TPU_DEVICES):
        pytest.skip("on a TPU machine hidden GPUs do not mean CPU-only")
    plain = _python(_FIRST_OP, CUDA_VISIBLE_DEVICES="-1")
    assert plain.returncode == 0, plain.stderr[-2000:]
    if "cuInit" not in plain.stderr:
        pytest.skip("this TensorFlow build does not call cuInit")
    for hidden in ("-1", ""):
        quiet = _python("import dml_tf; dml_tf.quiet(); " + _FIRST_OP, CUDA_VISIBLE_DEVICES=hidden)
        assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]


_MODEL = """
import os, sys
import dml_tf
MutualLearning = dml_tf.MutualLearning  # dml_tf's own import of TensorFlow
import keras
peers = [keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]) for _ in range(2)]
MutualLearning(peers)
print(os.environ.get("TF_CPP_MIN_LOG_LEVEL"), os.environ.get("TF_ENABLED_DEVICE_TYPES"),
      os.environ.get("TF_ENABLE_ONEDNN_OPTS"))
"""


def test_dml_tf_quiet_is_honoured_at_import_and_nothing_changes_unasked():
    if quiet_start.has_accelerator():
        pytest.skip("the CPU-only start-up lines are what this test is about")
    asked = _python(_MODEL, DML_TF_QUIET="1")
    assert asked.returncode == 0 and asked.stderr == "", asked.stderr[-2000:]
    assert asked.stdout.split() == ["1", "CPU", "1"]
    unasked = _python(_MODEL)
    assert unasked.returncode == 0, unasked.stderr[-2000:]
    assert unasked.stdout.split() == ["None", "None", "None"]  # the user's environment, untouched
    assert unasked.stderr != ""  # TensorFlow's own start-up lines: what DML_TF_QUIET removes


_ONEDNN_ON = ("from tensorflow.python.util import _pywrap_util_port; "
              "print(_pywrap_util_port.IsMklEnabled())")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="TensorFlow's x86 builds are the ones that leave oneDNN off on some CPUs")
def test_quiet_start_turns_onednn_on_unless_the_user_turned_it_off():
    # TensorFlow itself reports whether its oneDNN kernels are on, whatever this CPU's default.
    on = _python("import dml_tf; dml_tf.quiet(); " + _ONEDNN_ON)
    assert on.returncode == 0 and on.stdout.split() == ["True"], on.stderr[-2000:]
    off = _python("import dml_tf; dml_tf.quiet(); " + _ONEDNN_ON, TF_ENABLE_ONEDNN_OPTS="0")
    assert off.returncode == 0 and off.stdout.split() == ["False"], off.stderr[-2000:]
