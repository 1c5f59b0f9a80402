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

import keras

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
