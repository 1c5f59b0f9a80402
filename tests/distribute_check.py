"""Runs distribution checks in a fresh process (logical devices must be set before TF starts).

  python tests/distribute_check.py mirrored          -> JSON: single-device vs mirrored gaps
  python tests/distribute_check.py per_device        -> JSON: each peer's variable devices
  python tests/distribute_check.py worker I PORTS DIR -> JSON: a multi-worker run's final weights

Called by tests/distribute_test.py; not a test module itself.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dml_tf import config as config_lib  # noqa: E402
from dml_tf import methods, train_lib  # noqa: E402
from dml_tf.cohort import Cohort  # noqa: E402


def _split_cpu(n=2):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def _plain_model(seed, name):
    """Conv + dense without BatchNorm: BN statistics are per replica, which would differ."""
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
    h = keras.layers.GlobalAveragePooling2D(name="features")(h)
    logits = keras.layers.Dense(5, kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(h)
    return keras.Model(inputs, logits, name=name)


def mirrored():
    _split_cpu()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 8, 8, 3)).astype(np.float32)  # three global batches of 8
    y = rng.integers(0, 5, size=(3, 8))
    gaps = {}
    for update in ("sequential", "simultaneous"):
        single = Cohort([_plain_model(1, "a"), _plain_model(3, "b")],
                        [keras.optimizers.SGD(0.1, momentum=0.9) for _ in range(2)],
                        methods.get("dml"), update, weight_decay=5e-4)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            models = [_plain_model(1, "a"), _plain_model(3, "b")]
            opts = [keras.optimizers.SGD(0.1, momentum=0.9) for _ in range(2)]
        mirrored_cohort = Cohort(models, opts, methods.get("dml"), update, weight_decay=5e-4,
                                 strategy=strategy)
        dist = iter(strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).unbatch().batch(8)))
        loss_gap = 0.0
        for i in range(3):
            a = single.train_step(tf.constant(x[i]), tf.constant(y[i]))
            b = mirrored_cohort.train_step(*next(dist))
            loss_gap = max(loss_gap, max(abs(float(a[k]) - float(b[k])) for k in a))
        weight_gap = max(float(np.max(np.abs(u.numpy() - v.numpy())))
                         for m1, m2 in zip(single.models, mirrored_cohort.models)
                         for u, v in zip(m1.variables, m2.variables))
        gaps[update] = {"loss": loss_gap, "weights": weight_gap,
                        "replicas": strategy.num_replicas_in_sync}
    print(json.dumps(gaps))


def per_device(model_dir):
    _split_cpu()
    cfg = config_lib.Config(dataset="npz", data_dir=_npz(model_dir), nets=("tiny", "tiny"),
                            method="dml", peer_placement="per_device", epochs=1,
                            steps_per_epoch=2, batch_size=8, export=False,
                            model_dir=os.path.join(model_dir, "run"))
    cohort, _ = train_lib.train_cohort(cfg)
    print(json.dumps({"update": cohort.update,
                      "devices": [sorted({v.value.device for v in m.variables})
                                  for m in cohort.models],
                      "slot_devices": [sorted({v.value.device for v in o.variables[1:]})
                                       for o in cohort.optimizers]}))


def mirrored_run(model_dir):
    """The whole loop under MirroredStrategy: checkpoints, summaries, results and export."""
    _split_cpu()
    cfg = config_lib.Config(dataset="npz", data_dir=_npz(model_dir), nets=("tiny", "tiny"),
                            method="dml", distribution="mirrored", epochs=2, steps_per_epoch=2,
                            batch_size=8, export=True, model_dir=os.path.join(model_dir, "run"))
    cohort, results = train_lib.train_cohort(cfg)
    print(json.dumps({"replicas": cohort.strategy.num_replicas_in_sync,
                      "step": int(cohort.optimizers[0].iterations.numpy()),
                      "top1": results["test/peer1/top1"]}))


def _npz(folder):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "data.npz")
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        # Written aside and renamed: two workers start at once, and the one that finds the
        # file must never read it half-written (it would stop, and its peer wait forever).
        partial = os.path.join(folder, f"data.{os.getpid()}.partial.npz")
        np.savez(partial, x_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
                 y_train=np.arange(64) % 4,
                 x_test=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
                 y_test=np.arange(16) % 4)
        os.replace(partial, path)
    return path


def worker(index, ports, folder):
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
        "task": {"type": "worker", "index": int(index)}})
    cfg = config_lib.Config(dataset="npz", data_dir=_npz(folder), nets=("tiny", "tiny"),
                            method="dml", distribution="multi_worker", epochs=1,
                            steps_per_epoch=3, batch_size=8, export=True, eval_batch_size=16,
                            model_dir=os.path.join(folder, "run"))
    cohort, _ = train_lib.train_cohort(cfg)
    flat = np.concatenate([v.numpy().ravel() for m in cohort.models for v in m.trainable_variables])
    print(json.dumps({"index": int(index), "sum": float(flat.sum()),
                      "weights": flat[:50].tolist(),
                      "step": int(cohort.optimizers[0].iterations.numpy())}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "mirrored":
        mirrored()
    elif mode == "per_device":
        per_device(sys.argv[2])
    elif mode == "mirrored_run":
        mirrored_run(sys.argv[2])
    else:
        worker(*sys.argv[2:5])
