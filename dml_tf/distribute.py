"""Strategies and peer placement: TensorFlow's own distribution, chosen by name.

* "none": one device (the default strategy).
* "mirrored": tf.distribute.MirroredStrategy over the local devices. Every replica holds the
  whole cohort; the global batch is split across replicas (data parallelism).
* "multi_worker": tf.distribute.MultiWorkerMirroredStrategy configured from the TF_CONFIG
  environment variable, for cohorts that outgrow one machine.

Independently, `peer_devices` places peer k on device k mod n (the paper's distributed DML,
Sec. 4.5): each peer's variables and compute live on its own device and only the probability
vectors cross devices; the update order is then simultaneous.
"""

import json
import os

import tensorflow as tf

from dml_tf.errors import UserError

from dml_tf.choices import DISTRIBUTIONS, PLACEMENTS  # noqa: F401


def make_strategy(name, devices=None):
    """The tf.distribute strategy called `name` (None for "none").

    Args:
      name: one of DISTRIBUTIONS.
      devices: for "mirrored", the devices to mirror over (default: all local GPUs, or the CPU).
    """
    if name == "none":
        return None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise UserError("--distribution=multi_worker reads the cluster from the TF_CONFIG "
                            "environment variable, which is not set; see the README's two-machine "
                            "example.")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError:
            raise UserError("TF_CONFIG is not valid JSON; see the README's two-machine example.") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise UserError(f"--distribution={name} is not known; choose one of {', '.join(DISTRIBUTIONS)}.")


def local_devices():
    """The local devices peers can be placed on: GPUs where there are any, else the CPUs."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def peer_devices(num_peers, devices=None):
    """Device of peer k = devices[k mod n] (0-based k)."""
    devices = devices or local_devices()
    return [devices[k % len(devices)] for k in range(num_peers)]


def is_chief(strategy):
    """Whether this process writes checkpoints, summaries and exports (worker 0, or alone)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


def replica_batch_size(global_batch_size, strategy):
    """The per-replica share of the global batch; UserError where it does not divide."""
    replicas = strategy.num_replicas_in_sync if strategy else 1
    if global_batch_size % replicas:
        raise UserError(f"--batch_size={global_batch_size} must be divisible by the "
                        f"{replicas} replicas of --distribution.")
    return global_batch_size // replicas
