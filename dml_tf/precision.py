"""Numeric precision of the cohort: Keras mixed precision, losses always in float32.

`--precision`:
  * "float32": everything in float32 (the default).
  * "mixed_bfloat16": layers compute in bfloat16 and keep float32 variables (Keras' mixed
    policy). For CPUs with AVX-512 BF16 or AMX, and TPUs; bfloat16 has float32's exponent
    range, so no loss scaling is needed.
  * "mixed_float16": the same with float16, for GPUs with tensor cores; the optimisers are
    wrapped in `keras.optimizers.LossScaleOptimizer` (dynamic loss scaling) so that small
    gradients do not underflow.

Under either mixed policy the networks' "logits" layer computes in float32 (`nets.build`)
and BatchNormalization keeps float32 statistics, so softmax, cross-entropy and the KL
mimicry terms always see float32 numbers.
"""

import contextlib
import sys

import keras
import tensorflow as tf

from dml_tf.choices import PRECISIONS  # noqa: F401


@contextlib.contextmanager
def policy(precision):
    """Keras' global dtype policy is `precision` inside the block (for building networks).

    Layers keep the policy they were built with, so restoring the previous global policy
    afterwards affects nothing already built.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def wrap_optimizer(optimizer, precision):
    """`optimizer`, behind dynamic loss scaling when `precision` computes in float16."""
    if precision == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


# Where Linux describes the CPU, and the x86 flags of the instructions that compute in
# bfloat16; without them TensorFlow emulates every bfloat16 operation.
CPUINFO = "/proc/cpuinfo"
_BFLOAT16_X86_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_emulates_bfloat16(cpuinfo):
    """Whether the CPU that file `cpuinfo` describes is x86 without bfloat16 instructions
    (False where unsure)."""
    try:
        with open(cpuinfo) as lines:
            for line in lines:
                if line.startswith("flags"):  # x86 only (Arm's line is "Features")
                    flags = line.partition(":")[2].split()
                    return not any(flag in flags for flag in _BFLOAT16_X86_FLAGS)
    except OSError:
        pass
    return False


def warn_if_emulated(models):
    """One line on stderr when a model computes in bfloat16 on a CPU that emulates it."""
    if not any(layer.compute_dtype == "bfloat16" for model in models
               for layer in (model, *model.layers)):
        return
    if any(d.device_type != "CPU" for d in tf.config.list_logical_devices()):
        return  # the layers run on the accelerator
    if cpu_emulates_bfloat16(CPUINFO):
        print("warning: the peers compute in bfloat16 (mixed_bfloat16), but this CPU has no "
              "bfloat16 instructions (neither AVX-512 BF16 nor AMX), so TensorFlow emulates "
              "them: a ResNet-32 pair trained 8-15x slower than in float32 on such a CPU; "
              "train in float32 here.", file=sys.stderr, flush=True)
