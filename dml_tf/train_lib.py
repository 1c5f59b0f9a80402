"""train_and_evaluate: config -> data -> cohort -> training loop, summaries, checkpoints, export.

The only module (with export.py) that writes to disk. Everything it writes goes to
`config.model_dir`; a model_dir that holds a checkpoint is resumed.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time

import keras
from absl import app
from absl import logging as absl_logging
import tensorflow as tf

from dml_tf import cohort as cohort_lib
from dml_tf import config as config_lib
from dml_tf import distribute, export, imagenet_task, methods, nets, precision, reid_task, schedules, tasks  # noqa: F401 (the *_task modules register their datasets)
from dml_tf.errors import UserError

# Config fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = ("epochs", "eval_every_epochs", "export", "steps_per_epoch", "eval_batch_size",
                      "data_dir", "tfds_data_dir", "model_dir", "jit_compile", "train_steps",
                      "intra_op_threads", "inter_op_threads",
                      "overwrite", "deterministic", "on_nan", "checkpoint_every_steps",
                      "teacher_checkpoint")


def write_json_atomically(path, obj):
    """Writes JSON to a temporary file and renames it, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


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
                                 steps_per_epoch=steps_per_epoch)
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
    """tf.train.Checkpoint of the cohort: `epoch`, `peer{k}` models and `optimizer{k}`."""
    trackables = {"epoch": tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch"),
                  # Steps already done in `epoch`: a mid-epoch checkpoint resumes there.
                  "step_in_epoch": tf.Variable(0, dtype=tf.int64, trainable=False,
                                               name="step_in_epoch")}
    for k, (model, opt) in enumerate(zip(cohort.models, cohort.optimizers), start=1):
        trackables[f"peer{k}"] = model
        trackables[f"optimizer{k}"] = opt
    return tf.train.Checkpoint(**trackables)


def load_config(model_dir):
    """The Config a finished or running model_dir was trained with (its flags.json)."""
    path = os.path.join(model_dir, "flags.json")
    if not os.path.exists(path):
        raise UserError(f"{model_dir} holds no flags.json; point --model_dir at a run's folder.")
    with open(path) as f:
        values = json.load(f)
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
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if latest is None:
        raise UserError(f"{model_dir}/checkpoints holds no checkpoint; train the run first.")
    make_checkpoint(cohort).restore(latest).expect_partial()
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
    print(f"Teacher (peer 1) restored from {prefix}, peer{config.teacher_peer}.")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of the exact position was written."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


class _StopRequests:
    """Turns SIGINT/SIGTERM into a request the loop honours at the next step boundary."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _check_model_dir(config):
    """Refuses a model_dir that holds a run of another configuration (unless --overwrite)."""
    path = os.path.join(config.model_dir, "flags.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f)
    current = json.loads(config.to_json())
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES
                     and k in previous and previous[k] != current[k])
    if changed and config.overwrite:
        print(f"--overwrite: removing the previous run in {config.model_dir}.")
        shutil.rmtree(config.model_dir)
        os.makedirs(config.model_dir)
    elif changed:
        raise UserError(
            f"--model_dir={config.model_dir} holds a run with different {', '.join(changed)} "
            f"(see its flags.json); pass a new --model_dir, or --overwrite to replace it.")


def _progress_values(step_metrics, num_peers):
    values = []
    for k in range(1, num_peers + 1):
        values.append((f"p{k}_loss", step_metrics[f"peer{k}/total"]))
        values.append((f"p{k}_acc", step_metrics[f"peer{k}/top1"]))
    return values


def _check_finite(step_metrics, num_peers, step, model_dir, on_nan):
    for k in range(1, num_peers + 1):
        value = step_metrics[f"peer{k}/total"]
        if not math.isfinite(value) and on_nan == "stop":
            raise UserError(
                f"Peer {k}'s loss became {value} at step {step}; training stopped and the last "
                f"checkpoint in {model_dir} is kept: lower --learning_rate and run again to resume "
                f"(or --on_nan=skip to drop such updates).")


def _set_threads(config):
    """Applies --intra_op_threads / --inter_op_threads (0 leaves TensorFlow's choice)."""
    threading_config = tf.config.threading
    for name, get, put in (
            ("intra_op_threads", threading_config.get_intra_op_parallelism_threads,
             threading_config.set_intra_op_parallelism_threads),
            ("inter_op_threads", threading_config.get_inter_op_parallelism_threads,
             threading_config.set_inter_op_parallelism_threads)):
        wanted = getattr(config, name)
        if wanted and get() != wanted:
            try:
                put(wanted)
            except RuntimeError as e:  # TensorFlow fixes its thread pools at its first op.
                raise UserError(f"--{name}={wanted} cannot be applied: TensorFlow already "
                                "started in this process; set it in a fresh process (a run "
                                "script sets it first).") from e


def train_and_evaluate(config):
    """Trains the cohort of `config`, evaluates it, writes everything to config.model_dir.

    Returns:
      The final metrics (also written to model_dir/results.json).
    """
    return train_cohort(config)[1]


def train_cohort(config, task=None):
    """train_and_evaluate, also returning the trained cohort.

    Args:
      config: the run's Config.
      task: a task (dml_tf.tasks) to train on instead of the one of `config.dataset`, e.g.
        `tasks.ClassificationTask(image_data)` for arrays of a benchmark's own.

    Returns:
      (cohort, final metrics).
    """
    _set_threads(config)
    os.makedirs(config.model_dir, exist_ok=True)
    _check_model_dir(config)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        # Same seed, same ops order: a resumed run ends with the uninterrupted run's weights.
        tf.config.experimental.enable_op_determinism()

    task = (task or tasks.make(config)).semi_supervised(config.semi_supervised, config)
    method = methods.get(config.method, **dict(config.method_args))
    held_out = None
    if getattr(method, "needs_validation", False):
        task, held_out = task.split_validation(config.val_fraction, config.seed)
    steps_per_epoch = task.num_train // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size={config.batch_size} is larger than the training set "
                        f"({task.num_train} images); lower it.")
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    epochs = config.epochs
    if config.train_steps:
        epochs = math.ceil(config.train_steps / steps_per_epoch)
    strategy = distribute.make_strategy(config.distribution)
    replica_batch = distribute.replica_batch_size(config.batch_size, strategy)
    chief = distribute.is_chief(strategy)
    cohort = build_cohort(config, task.num_classes, task.input_shape, steps_per_epoch, strategy)
    num_peers = cohort.num_peers
    views = num_peers if config.per_peer_augmentation else 1

    checkpoint = make_checkpoint(cohort)
    epoch_var = checkpoint.epoch
    position_var = checkpoint.step_in_epoch
    # Every multi-worker process saves (saving is collective), the chief into model_dir and
    # the others into a scratch folder of their own that is never read.
    checkpoint_dir = os.path.join(config.model_dir, "checkpoints")
    if not chief:
        checkpoint_dir = os.path.join(config.model_dir, f"worker_scratch_{strategy.cluster_resolver.task_id}")
    manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=3)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        print(f"Resumed from {manager.latest_checkpoint} (epoch {int(epoch_var.numpy()) + 1}, "
              f"step {int(position_var.numpy())} of it; global step "
              f"{int(cohort.optimizers[0].iterations.numpy())}).")
    elif getattr(cohort.method, "needs_teacher", False):
        load_teacher(cohort.models[0], config)
    if chief:
        write_json_atomically(os.path.join(config.model_dir, "flags.json"),
                              json.loads(config.to_json()))

    writer = tf.summary.create_file_writer(config.model_dir) if chief else tf.summary.create_noop_writer()

    def save(epoch, step_in_epoch):
        epoch_var.assign(epoch)
        position_var.assign(step_in_epoch)
        manager.save(checkpoint_number=int(cohort.optimizers[0].iterations.numpy()))

    def epoch_dataset(epoch):
        # A seed per epoch: a resumed run draws the data order its epoch would have had.
        seed = config.seed * 100003 + epoch
        if cohort.distributed:
            # Each input pipeline batches its replicas' share; with several workers it reads
            # its own shard of the batches.
            return strategy.distribute_datasets_from_function(
                lambda ctx: task.train_dataset(replica_batch, seed=seed, views=views)
                .shard(ctx.num_input_pipelines, ctx.input_pipeline_id))
        return task.train_dataset(config.batch_size, seed=seed, views=views)

    results = {}
    start_epoch, skip = int(epoch_var.numpy()), int(position_var.numpy())
    started = time.time()
    with _StopRequests() as stop:
        for epoch in range(start_epoch, epochs):
            steps = steps_per_epoch
            if config.train_steps:
                steps = min(steps, config.train_steps - epoch * steps_per_epoch)
            if skip >= steps:  # a budget that ended exactly where the last run stopped
                skip = 0
                continue
            method_summaries = {}
            if held_out is not None:
                probs, labels = task.predict_probabilities(cohort, *held_out, config.eval_batch_size)
                cohort.method.update_weights(probs, labels)
                method_summaries = cohort.method.summaries()
            print(f"Epoch {epoch + 1}/{epochs}")
            progbar = keras.utils.Progbar(steps)
            sums, skipped = {}, {}
            batches = tasks.diagnosed(task, epoch_dataset(epoch))
            for _ in range(skip):  # resume mid-epoch: the same batches, already trained on
                next(batches)
            for step in range(skip + 1, steps + 1):
                images, labels = next(batches)
                if config.semi_supervised == "dml_all" and not cohort.distributed:
                    # Unlabelled examples carry label −1: no cross-entropy, mimicry only.
                    mask = tf.cast(labels >= 0, tf.float32)
                    outputs = cohort.train_step(images, tf.maximum(labels, 0), mask)
                else:
                    outputs = cohort.train_step(images, labels)
                step_metrics = {k: float(v) for k, v in outputs.items()}
                global_step = int(cohort.optimizers[0].iterations.numpy())
                _check_finite(step_metrics, num_peers, global_step, config.model_dir, config.on_nan)
                for key, value in step_metrics.items():
                    if math.isfinite(value):
                        sums[key] = sums.get(key, 0.0) + value
                    elif key.endswith("/total"):
                        skipped[key] = skipped.get(key, 0) + 1
                progbar.update(step, _progress_values(step_metrics, num_peers))
                if stop.signum is not None:
                    save(epoch, step)
                    name = signal.Signals(stop.signum).name
                    raise Interrupted(stop.signum, (
                        f"{name}: stopped at epoch {epoch + 1}, step {step}; a checkpoint of this "
                        f"position is in {checkpoint_dir}: run the same command to resume."))
                if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 \
                        and step < steps:
                    save(epoch, step)
            done = steps - skip
            skip = 0
            train_metrics = {f"train/{k}": v / done for k, v in sums.items()}
            train_metrics |= {f"train/{k.replace('/total', '/skipped_steps')}": float(n)
                              for k, n in skipped.items()}
            with writer.as_default(step=global_step):
                for key, value in (train_metrics | method_summaries).items():
                    tf.summary.scalar(key, value)
                for k, opt in enumerate(cohort.optimizers, start=1):
                    tf.summary.scalar(f"lr/peer{k}", float(opt.learning_rate.numpy()))
                last = epoch + 1 == epochs
                if last or (epoch + 1) % config.eval_every_epochs == 0:
                    test_metrics = task.evaluate(cohort, config.eval_batch_size)
                    for key, value in test_metrics.items():
                        tf.summary.scalar(key, value)
                    print("  " + "  ".join(f"{k}={v:.4f}" for k, v in test_metrics.items()
                                           if k.rsplit("/", 1)[-1] in task.headline_metrics))
                    results = train_metrics | test_metrics
            writer.flush()
            if steps < steps_per_epoch:  # a --train_steps budget ended inside this epoch
                save(epoch, steps)
            else:
                save(epoch + 1, 0)

    if not chief:  # the scratch copies only existed because saving is collective
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if not results:  # Resumed a finished run: nothing trained, evaluate what is there.
        results = task.evaluate(cohort, config.eval_batch_size)
    if chief:
        write_json_atomically(os.path.join(config.model_dir, "results.json"), results)
    if config.export and chief:
        paths = export.export_cohort(cohort, os.path.join(config.model_dir, "export"),
                                     task.preprocess, serving_shape=task.serving_shape)
        export.check_export(paths, cohort, task.export_sample(), task.preprocess)
    print(f"Trained {max(0, epochs - start_epoch)} epochs in {time.time() - started:.0f}s.")
    print(f"Results: {os.path.join(config.model_dir, 'results.json')}")
    print(f"Watch:   tensorboard --logdir {config.model_dir}")
    return cohort, results


def absl_main(make_config):
    """The `main(argv)` a run script hands to absl's app.run: no stray arguments, then `main`."""

    def absl_entry(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
        main(make_config)

    return absl_entry


def main(make_config):
    """Run-script entry: builds the config and trains.

    A UserError exits 2 with its one sentence; SIGINT/SIGTERM save a checkpoint of the
    exact position and exit 128 + the signal number, as shells expect.
    """
    # TensorFlow's INFO lines (checkpoint sharding, SavedModel assets) would bury the progress.
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        train_and_evaluate(make_config())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(128 + e.signum)
