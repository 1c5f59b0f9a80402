"""Shared by the speed benchmarks: a cohort built through dml_tf's public API, timed.

`worker_main()` makes a script double as its own measuring subprocess: options that must
be set before TensorFlow starts (environment variables, thread pools) and peak memory
need a fresh process per measurement.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from dml_tf import quiet_start  # noqa: E402

# The environment the run scripts give TensorFlow (oneDNN on where TensorFlow leaves it
# off), so that the benchmarks time what a run trains with.
quiet_start.configure_environment()


def make_cohort(num_peers=2, net="resnet32", method="dml", update="simultaneous", *,
                num_classes=100, precision="float32", jit_compile=False, fused=True):
    """A cohort as the run scripts build it: SGD Nesterov 0.9, lr 0.1, weight decay 5e-4.

    `fused=False` builds the networks without `nets.build`'s fused BatchNormalization
    (Keras' own layer), to measure what the fused kernel brings.
    """
    import keras

    from dml_tf import methods, nets
    from dml_tf import precision as precision_lib
    from dml_tf.cohort import Cohort

    keras.utils.set_random_seed(0)
    with precision_lib.policy(precision):
        if fused:
            models = [nets.build(net, num_classes, (32, 32, 3), name=f"peer{k}")
                      for k in range(1, num_peers + 1)]
        else:
            models = [nets._BUILDERS[net](num_classes, (32, 32, 3), name=f"peer{k}")
                      for k in range(1, num_peers + 1)]
    optimizers = [precision_lib.wrap_optimizer(
        keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True), precision) for _ in models]
    return Cohort(models, optimizers, methods.get(method), update, weight_decay=5e-4,
                  jit_compile=jit_compile)


def set_threads(intra_op, inter_op):
    """TensorFlow's intra-/inter-op thread counts (0: TensorFlow's own choice); before any op."""
    import tensorflow as tf

    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def parse_options(items):
    """["jit_compile=true", ...] -> {"jit_compile": True, ...}: make_cohort options from flags."""
    options = {}
    for item in items:
        key, value = item.split("=", 1)
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def in_memory_batches(batch_size, num_classes=100):
    """The same random batch forever, already a tensor."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(batch_size, 32, 32, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, num_classes, batch_size), tf.int64)
    while True:
        yield images, labels


def seconds_per_step(cohort, batches, steps, warmup=1):
    """Mean wall seconds of `steps` train steps from `batches`, after `warmup` steps."""
    for _ in range(warmup):
        float(cohort.train_step(*next(batches))["peer1/loss"])
    start = time.perf_counter()
    for _ in range(steps):
        out = cohort.train_step(*next(batches))
    float(out["peer1/loss"])
    return (time.perf_counter() - start) / steps


def peak_rss_mb():
    """This process's peak resident memory so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script, args, env=None):
    """Runs `script --worker ...args` in a fresh process; returns the JSON it prints last."""
    argv = [sys.executable, script, *args]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, **(env or {})))
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternate(measure, names, rounds, log=None):
    """{name: [values]} from `rounds` rounds, the order of `names` reversed every other round
    so that slow drifts of a shared machine hit every variant alike."""
    values = {name: [] for name in names}
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            values[name].append(measure(name))
        if log:
            log(i, {name: v[-1] for name, v in values.items()})
    return values


def median(values):
    return statistics.median(values)


def machine():
    """One line: CPU count, TensorFlow and Keras versions."""
    import keras
    import tensorflow as tf

    return f"{os.cpu_count()} CPUs, TF {tf.__version__}, Keras {keras.__version__}"
