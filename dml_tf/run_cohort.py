"""A run's cohort from its configuration and checkpoints: build, restore, load a teacher.

What the run scripts' loop (dml_tf.train_lib) and the tools that read a finished run
(dml_tf.analysis) share: the peers named peer1..peerK with their optimisers and method as a
Config says, the objects of a run's checkpoint, and kd's teacher from another run.
"""

import contextlib
import dataclasses
import json
import os

import tensorflow as tf

from dml_tf import checkpoints
from dml_tf import cohort as cohort_lib
from dml_tf import config as config_lib
from dml_tf import distribute, methods, nets, precision, schedules, tasks
from dml_tf.errors import UserError


def build_cohort(config, num_classes, input_shape, steps_per_epoch, strategy=None):
    """The K peers (named peer1..peerK), their optimisers and the method, as configured.

    Models and optimisers are built under `strategy`'s scope (data parallelism) and, with
    --peer_placement=per_device, peer k under device k mod n (simultaneous updates).
    """
    net_args = dict(config.net_args)
    if config.init == "imagenet":
        net_args["weights"] = "imagenet"  # Keras' ImageNet weights (needs network once)
    elif config.init_checkpoint:
        net_args["weights"] = config.init_checkpoint  # a local Keras weights file
    per_device = config.peer_placement == "per_device"
    devices = distribute.peer_devices(len(config.nets)) if per_device else [None] * len(config.nets)
    lr = schedules.learning_rate(config.learning_rate, decay_rate=config.lr_decay_rate,
                                 decay_epochs=config.lr_decay_epochs,
                                 steps_per_epoch=steps_per_epoch,
                                 warmup_epochs=config.warmup_epochs)
    models, optimizers = [], []
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope, precision.policy(config.precision):
        for k, name in enumerate(config.nets, start=1):
            with tf.device(devices[k - 1]) if per_device else contextlib.nullcontext():
                models.append(nets.build(name, num_classes, input_shape, name=f"peer{k}",
                                         **net_args))
                optimizers.append(precision.wrap_optimizer(schedules.optimizer(
                    config.optimizer, lr, momentum=config.momentum, nesterov=config.nesterov,
                    beta_1=config.adam_beta1, beta_2=config.adam_beta2, epsilon=config.epsilon,
                    rho=config.rmsprop_decay), config.precision))
    method = methods.get(config.method, **dict(config.method_args))
    # The paper's distributed DML: peers on separate devices update simultaneously.
    update = "simultaneous" if per_device else config.update
    return cohort_lib.Cohort(models, optimizers, method, update,
                             weight_decay=config.weight_decay, jit_compile=config.jit_compile,
                             strategy=strategy, peer_devices=devices if per_device else None,
                             skip_nonfinite=config.on_nan == "skip")


def make_checkpoint(cohort):
    """tf.train.Checkpoint of the cohort: `epoch`, the cohort's `step_counter`, `peer{k}`
    models and `optimizer{k}`."""
    return tf.train.Checkpoint(**checkpoint_trackables(cohort))


def checkpoint_trackables(cohort):
    """The objects of a run's checkpoint, by name (make_checkpoint)."""
    trackables = {"epoch": tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch"),
                  "step_counter": cohort.step_counter,
                  # Steps already done in `epoch`: a mid-epoch checkpoint resumes there.
                  "step_in_epoch": tf.Variable(0, dtype=tf.int64, trainable=False,
                                               name="step_in_epoch"),
                  # The running sums of those steps' metrics (JSON), so that a resumed epoch
                  # reports the means of all its steps.
                  "epoch_means": tf.Variable("", dtype=tf.string, trainable=False,
                                             name="epoch_means"),
                  # Whether the epoch-end work (summaries, evaluation) is done for this
                  # position: a SIGTERM during an evaluation saves an unclosed position.
                  "closed": tf.Variable(False, trainable=False, name="closed")}
    for k, (model, opt) in enumerate(zip(cohort.models, cohort.optimizers), start=1):
        trackables[f"peer{k}"] = model
        trackables[f"optimizer{k}"] = opt
    return trackables


def restore_checkpoint(cohort, trackables, directory, *, quarantine=True):
    """checkpoints.restore_newest_intact of the run's `trackables` (see make_checkpoint),
    also for checkpoints written before the cohort had a step counter: their count is then
    the most any peer's optimizer stepped."""
    try:
        return checkpoints.restore_newest_intact(tf.train.Checkpoint(**trackables), directory,
                                                 quarantine=quarantine)
    except UserError:
        older = {k: v for k, v in trackables.items() if k != "step_counter"}
        try:
            restored = checkpoints.restore_newest_intact(tf.train.Checkpoint(**older), directory,
                                                         quarantine=False)
        except UserError:
            restored = None
        if restored is None:
            raise
    cohort.step_counter.assign(max(int(o.iterations.numpy()) for o in cohort.optimizers))
    return restored


def load_config(model_dir):
    """The Config a finished or running model_dir was trained with (its flags.json)."""
    path = os.path.join(model_dir, "flags.json")
    if not os.path.exists(path):
        raise UserError(f"{model_dir} holds no flags.json; point --model_dir at a run's folder.")
    try:
        with open(path) as f:
            values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a run's configuration ({str(e)[:80]}).") from None
    fields = {f.name for f in dataclasses.fields(config_lib.Config)}
    values = {k: v for k, v in values.items() if k in fields}
    for key, value in values.items():  # JSON turned the config's tuples into lists
        if isinstance(value, list):
            values[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return config_lib.Config(**values)


def restore_cohort(model_dir, data=None):
    """Rebuilds a run's cohort and data and loads its latest checkpoint (for analysis).

    Args:
      model_dir: a run's folder (flags.json and checkpoints/).
      data: the ImageData, where the run's dataset cannot be loaded from its config.

    Returns:
      (config, cohort, data): data is an ImageData of the run's images as its networks see
      them (classification: the dataset itself; Market-1501: a seeded subset, see
      ReidTask.as_image_data).
    """
    config = load_config(model_dir)
    task = tasks.ClassificationTask(data) if data is not None else tasks.make(config)
    data = getattr(task, "data", None)
    if data is None and hasattr(task, "as_image_data"):
        data = task.as_image_data(seed=config.seed)
    steps_per_epoch = max(1, task.num_train // config.batch_size)
    cohort = build_cohort(config, task.num_classes, task.input_shape, steps_per_epoch)
    restored = restore_checkpoint(cohort, checkpoint_trackables(cohort),
                                  os.path.join(model_dir, "checkpoints"), quarantine=False)
    if restored is None:
        raise UserError(f"{model_dir}/checkpoints holds no checkpoint; train the run first.")
    return config, cohort, data


def load_teacher(model, config):
    """Restores kd's fixed teacher (peer 1) from --teacher_checkpoint.

    Accepts a finished run's model_dir (its latest checkpoint) or a checkpoint prefix; the
    run's peer `config.teacher_peer` must have the same architecture and class count.
    """
    path = config.teacher_checkpoint
    if not path:
        raise UserError(f"--method={config.method} distils from a fixed teacher: pass "
                        "--teacher_checkpoint at the teacher run's --model_dir.")
    prefix = path
    if os.path.isdir(path):
        prefix = tf.train.latest_checkpoint(os.path.join(path, "checkpoints")) or \
            tf.train.latest_checkpoint(path)
    if not prefix or not tf.io.gfile.glob(prefix + ".index"):
        raise UserError(f"--teacher_checkpoint={path} holds no checkpoint; point it at a "
                        "finished run's --model_dir.")
    try:
        status = tf.train.Checkpoint(**{f"peer{config.teacher_peer}": model}).restore(prefix)
        status.expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as e:
        raise UserError(
            f"--teacher_checkpoint={path} does not hold a peer{config.teacher_peer} shaped like "
            f"--nets' first network ({config.nets[0]}) with this dataset's classes: "
            f"{str(e).splitlines()[0][:200]}") from None
    except tf.errors.OpError as e:  # a damaged or truncated file (after the above)
        raise UserError(f"--teacher_checkpoint={path}: {prefix} cannot be read "
                        f"({str(e).splitlines()[0][:120]}); point it at an intact checkpoint of "
                        "the teacher run.") from None
    print(f"Teacher (peer 1) restored from {prefix}, peer{config.teacher_peer}.")
