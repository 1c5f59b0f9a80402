"""--precision (Keras mixed precision, float32 losses) and the thread-count flags."""

import dataclasses
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from dml_tf import config as config_lib
from dml_tf import methods, nets, precision, train_lib
from dml_tf.cohort import Cohort
from dml_tf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_policy_is_scoped_and_checked():
    before = keras.mixed_precision.global_policy().name
    with precision.policy("mixed_bfloat16"):
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == before
    with pytest.raises(ValueError, match="mixed_bfloat16"):
        with precision.policy("bfloat16"):
            pass


def test_mixed_networks_compute_in_bfloat16_with_float32_weights_and_logits():
    with precision.policy("mixed_bfloat16"):
        model = nets.build("resnet32", 10, (32, 32, 3))
    assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.weights)
    assert model.get_layer("logits").compute_dtype == "float32"
    logits = model(np.zeros((2, 32, 32, 3), np.float32), training=True)
    assert logits.dtype == tf.float32


def _linear(seed, dtype):
    inputs = keras.Input((4,))
    init = keras.initializers.RandomNormal(stddev=0.5, seed=seed)
    logits = keras.layers.Dense(3, kernel_initializer=init, dtype=dtype)(inputs)
    return keras.Model(inputs, logits)


def _one_step_update(dtype, wrap):
    models = [_linear(seed, dtype) for seed in (1, 2)]
    before = [m.get_weights()[0] for m in models]
    optimizers = [precision.wrap_optimizer(keras.optimizers.SGD(0.5), wrap) for _ in models]
    cohort = Cohort(models, optimizers, methods.get("dml"), "simultaneous")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(8, 4)), tf.float32)
    cohort.train_step(images, tf.constant(rng.integers(0, 3, 8), tf.int64))
    return [m.get_weights()[0] - b for m, b in zip(models, before)], optimizers


def test_float16_loss_scaling_applies_the_unscaled_update():
    reference, _ = _one_step_update("float32", "float32")
    scaled, optimizers = _one_step_update("mixed_float16", "mixed_float16")
    assert all(isinstance(o, keras.optimizers.LossScaleOptimizer) for o in optimizers)
    # Without the loss scaled inside the tape, the update would be 1/2^15 of this.
    for got, want in zip(scaled, reference):
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-3)


_X86_FLAGS = "fpu vme sse sse2 avx avx2 fma"  # abridged /proc/cpuinfo flags of an AVX2 CPU


@pytest.mark.parametrize("cpuinfo, dtype, warned", [
    (f"processor\t: 0\nflags\t\t: {_X86_FLAGS}\n", "mixed_bfloat16", True),
    (f"processor\t: 0\nflags\t\t: {_X86_FLAGS} avx512f avx512_bf16\n", "mixed_bfloat16", False),
    (f"processor\t: 0\nflags\t\t: {_X86_FLAGS} amx_bf16 amx_tile\n", "mixed_bfloat16", False),
    ("processor\t: 0\nFeatures\t: fp asimd bf16\n", "mixed_bfloat16", False),  # Arm: unsure
    (f"processor\t: 0\nflags\t\t: {_X86_FLAGS}\n", "float32", False),
    (None, "mixed_bfloat16", False),  # no /proc/cpuinfo: unsure, so silent
])
def test_bfloat16_on_a_cpu_that_emulates_it_is_a_warning(tmp_path, monkeypatch, capsys, cpuinfo,
                                                          dtype, warned):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    monkeypatch.setattr(precision, "CPUINFO", str(path))
    models = [_linear(seed, dtype) for seed in (1, 2)]
    Cohort(models, [keras.optimizers.SGD(0.1) for _ in models], methods.get("dml"), "simultaneous")
    err = capsys.readouterr().err
    assert (("no bfloat16 instructions" in err and "float32" in err) if warned else err == ""), err


def test_a_mixed_bfloat16_run_trains_and_exports(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "data.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
             y_train=np.arange(64) % 4, x_test=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
             y_test=np.arange(16) % 4)
    config = config_lib.Config(dataset="npz", data_dir=str(npz), nets=("tiny", "tiny"),
                               method="dml", epochs=1, steps_per_epoch=3, batch_size=8,
                               precision="mixed_bfloat16", model_dir=str(tmp_path / "run"))
    cohort, results = train_lib.train_cohort(config)
    assert cohort.models[0].get_layer("logits").compute_dtype == "float32"
    assert any(layer.compute_dtype == "bfloat16" for layer in cohort.models[0].layers)
    assert np.isfinite(results["test/peer1/top1"])
    served = tf.saved_model.load(str(tmp_path / "run" / "export" / "ensemble"))
    out = served.signatures["serving_default"](tf.zeros((2, 16, 16, 3), tf.uint8))
    assert out["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(tf.reduce_sum(out["probabilities"], -1), 1.0, rtol=1e-5)
    # The global policy is left as it was for whatever the process builds next.
    assert keras.mixed_precision.global_policy().name == "float32"


def test_thread_counts_are_applied_in_a_fresh_process():
    code = ("from dml_tf import config, train_lib; import tensorflow as tf; "
            "train_lib._set_threads(config.Config(intra_op_threads=1, inter_op_threads=3)); "
            "t = tf.config.threading; "
            "print(t.get_intra_op_parallelism_threads(), t.get_inter_op_parallelism_threads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=True)
    assert out.stdout.split() == ["1", "3"]


def test_thread_counts_after_tensorflow_started_are_a_clear_error():
    float(tf.constant(1.0) + 1.0)  # TensorFlow has started in this process
    wanted = tf.config.threading.get_intra_op_parallelism_threads() + 1
    with pytest.raises(UserError, match="--intra_op_threads.*fresh process"):
        train_lib._set_threads(config_lib.Config(intra_op_threads=wanted))


@pytest.mark.parametrize("name", ["intra_op_threads", "inter_op_threads"])
def test_negative_thread_counts_are_refused(name):
    with pytest.raises(UserError, match=f"--{name} must be 0"):
        config_lib.validate(dataclasses.replace(config_lib.Config(), **{name: -1}))
