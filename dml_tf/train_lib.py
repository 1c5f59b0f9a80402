"""train_and_evaluate: config -> data -> cohort -> the epoch loop, summaries, results, export.

Everything a run writes goes to `config.model_dir`, whose life (checks, lock, --overwrite,
atomic writes) is dml_tf.run_dir's and whose checkpoints (resume with fallback) are
dml_tf.checkpoints'; a model_dir that holds a checkpoint is resumed, a finished one is left
as it is.
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
import tensorflow as tf

from dml_tf import checkpoints, collapse, progress, run_dir
from dml_tf import cohort as cohort_lib
from dml_tf import config as config_lib
from dml_tf import distribute, export, imagenet_task, methods, nets, precision, reid_task, schedules, tasks  # noqa: F401 (the *_task modules register their datasets)
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
    """tf.train.Checkpoint of the cohort: `epoch`, `peer{k}` models and `optimizer{k}`."""
    trackables = {"epoch": tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch"),
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
    return tf.train.Checkpoint(**trackables)


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
    restored = checkpoints.restore_newest_intact(make_checkpoint(cohort),
                                                 os.path.join(model_dir, "checkpoints"),
                                                 quarantine=False)
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

    def interrupted(self, where, checkpoint_dir):
        """The Interrupted to raise once the position is saved in checkpoint_dir."""
        name = signal.Signals(self.signum).name
        return Interrupted(self.signum, f"{name}: {where}; a checkpoint of this position is in "
                                        f"{checkpoint_dir}: run the same command to resume.")

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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

    Raises:
      UserError: a mistake the user can fix (nothing is created before the inputs are checked).
      Interrupted: SIGINT/SIGTERM; a checkpoint of the exact position was written.
    """
    run_dir.check(config)  # before the data load: a refused run leaves nothing on disk
    _set_threads(config)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        # Same seed, same ops order: a resumed run ends with the uninterrupted run's weights.
        tf.config.experimental.enable_op_determinism()
    task = (task or tasks.make(config)).semi_supervised(config.semi_supervised, config)
    held_out = None
    if getattr(methods.get(config.method, **dict(config.method_args)), "needs_validation", False):
        task, held_out = task.split_validation(config.val_fraction, config.seed)
    schedule = _Schedule(config, task.num_train)
    strategy = distribute.make_strategy(config.distribution)
    cohort = build_cohort(config, task.num_classes, task.input_shape, schedule.steps_per_epoch,
                          strategy)
    started = time.time()
    with run_dir.RunDir(config, owner=distribute.is_chief(strategy)) as folder, \
            _StopRequests() as stop:
        run = _Run(config, task, cohort, folder, strategy, stop, held_out)
        run.restore_or_start()
        closed = run.train(schedule)
        results = run.finish(trained=closed > 0)
    if closed:
        print(f"Trained {closed} epochs in {time.time() - started:.0f}s.")
    print(f"Results: {folder.join('results.json')}")
    print(f"Watch:   {_tensorboard_command()} --logdir {config.model_dir}")
    return cohort, results


def _tensorboard_command():
    """The TensorBoard command as it runs from here: the venv's own where it is not on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    on_path = shutil.which("tensorboard")
    if os.path.exists(beside) and (not on_path or os.path.realpath(on_path) != os.path.realpath(beside)):
        return os.path.relpath(beside) if not os.path.relpath(beside).startswith("..") else beside
    return "tensorboard"


class _Schedule:
    """Steps per epoch and epochs of a run (a --train_steps budget cuts the last epoch short)."""

    def __init__(self, config, num_train):
        steps = num_train // config.batch_size
        if steps == 0:
            raise UserError(f"--batch_size={config.batch_size} is larger than the training set "
                            f"({num_train} images); lower it.")
        self.steps_per_epoch = min(steps, config.steps_per_epoch or steps)
        self.train_steps = config.train_steps
        self.epochs = config.epochs
        if config.train_steps:
            self.epochs = math.ceil(config.train_steps / self.steps_per_epoch)

    def steps(self, epoch):
        if self.train_steps:
            return min(self.steps_per_epoch, self.train_steps - epoch * self.steps_per_epoch)
        return self.steps_per_epoch


class _EpochMeans:
    """Running sums of an epoch's step metrics; non-finite (skipped) steps counted apart."""

    def __init__(self, state=None):
        state = json.loads(state) if state else {}
        self.sums = state.get("sums", {})
        self.skipped = state.get("skipped", {})
        self.steps = state.get("steps", 0)

    def add(self, step_metrics):
        self.steps += 1
        for key, value in step_metrics.items():
            if math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + value
            elif key.endswith("/total"):
                self.skipped[key] = self.skipped.get(key, 0) + 1

    def means(self):
        return {k: v / max(1, self.steps) for k, v in self.sums.items()}

    def train_metrics(self):
        return {f"train/{k}": v for k, v in self.means().items()} | {
            f"train/{k.replace('/total', '/skipped_steps')}": float(n) for k, n in self.skipped.items()}

    def state(self):
        return json.dumps({"sums": self.sums, "skipped": self.skipped, "steps": self.steps})


class _Run:
    """One training run in its folder: checkpoints, summaries, the epoch loop, the final writes."""

    def __init__(self, config, task, cohort, folder, strategy, stop, held_out):
        self.config, self.task, self.cohort, self.folder = config, task, cohort, folder
        self.strategy, self.stop, self.held_out = strategy, stop, held_out
        self.chief = folder.owner
        self.checkpoint = make_checkpoint(cohort)
        # Every multi-worker process saves (saving is collective), the chief into model_dir and
        # the others into a scratch folder of their own that is never read.
        self.checkpoint_dir = folder.join("checkpoints") if self.chief else folder.join(
            f"worker_scratch_{strategy.cluster_resolver.task_id}")
        self.manager = None
        self._writer = None
        self.results = {}

    def restore_or_start(self):
        try:
            restored = checkpoints.restore_newest_intact(self.checkpoint, self.checkpoint_dir)
        except UserError:
            if not (self.config.overwrite and self.chief):
                raise
            # --overwrite is the way out of a run whose checkpoints are all damaged.
            self.folder.remove_run_files()
            restored = None
        self.manager = checkpoints.manager(self.checkpoint, self.checkpoint_dir)
        if restored:
            print(f"Resumed from {restored} (epoch {int(self.checkpoint.epoch.numpy()) + 1}, "
                  f"step {int(self.checkpoint.step_in_epoch.numpy())} of it; global step "
                  f"{self.global_step}).")
        elif getattr(self.cohort.method, "needs_teacher", False):
            load_teacher(self.cohort.models[0], self.config)
        if self.chief:
            self.folder.write_json("flags.json", json.loads(self.config.to_json()))

    @property
    def global_step(self):
        return int(self.cohort.optimizers[0].iterations.numpy())

    @property
    def writer(self):
        """Created on first use: a finished run run again adds no empty event file."""
        if self._writer is None:
            self._writer = (tf.summary.create_file_writer(self.config.model_dir) if self.chief
                            else tf.summary.create_noop_writer())
        return self._writer

    def save(self, epoch, step_in_epoch, means, closed):
        self.checkpoint.epoch.assign(epoch)
        self.checkpoint.step_in_epoch.assign(step_in_epoch)
        self.checkpoint.epoch_means.assign(means.state())
        self.checkpoint.closed.assign(closed)
        self.manager.save(checkpoint_number=self.global_step)

    def train(self, schedule):
        """Trains and closes the epochs still to do; returns how many were closed (0: finished)."""
        state = self.checkpoint
        start, skip = int(state.epoch.numpy()), int(state.step_in_epoch.numpy())
        means = _EpochMeans(state.epoch_means.numpy().decode() if skip else None)
        closed = 0
        for epoch in range(start, schedule.epochs):
            steps = schedule.steps(epoch)
            if skip >= steps and bool(state.closed.numpy()):  # a budget that ended here
                skip, means = 0, _EpochMeans()
                continue
            last = epoch + 1 == schedule.epochs
            if skip < steps:
                self._train_epoch(epoch, schedule.epochs, steps, skip, means)
            self._close_epoch(epoch, steps, means, last,
                              next_position=(epoch, steps) if steps < schedule.steps_per_epoch
                              else (epoch + 1, 0))
            closed += 1
            skip, means = 0, _EpochMeans()
        return closed

    def _train_epoch(self, epoch, epochs, steps, skip, means):
        config, cohort = self.config, self.cohort
        if self.held_out is not None:
            probs, labels = self.task.predict_probabilities(cohort, *self.held_out,
                                                            config.eval_batch_size)
            cohort.method.update_weights(probs, labels)
        bar = progress.EpochProgress(epoch, epochs, steps, cohort.num_peers, config.batch_size,
                                     first_step=skip)
        batches = tasks.diagnosed(self.task, self._epoch_dataset(epoch))
        for _ in range(skip):  # resume mid-epoch: the same batches, already trained on
            next(batches)
        for step in range(skip + 1, steps + 1):
            images, labels = next(batches)
            step_metrics = {k: float(v) for k, v in self._step(images, labels).items()}
            _check_finite(step_metrics, cohort.num_peers, self.global_step, config.model_dir,
                          config.on_nan)
            means.add(step_metrics)
            bar.update(step, means.means())
            if self.stop.signum is not None:
                self.save(epoch, step, means, closed=False)
                raise self.stop.interrupted(f"stopped at epoch {epoch + 1}, step {step}", self.checkpoint_dir)
            if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 \
                    and step < steps:
                self.save(epoch, step, means, closed=False)
        bar.finish(means.means())

    def _step(self, images, labels):
        if self.config.semi_supervised == "dml_all" and not self.cohort.distributed:
            # Unlabelled examples carry label −1: no cross-entropy, mimicry only.
            mask = tf.cast(labels >= 0, tf.float32)
            return self.cohort.train_step(images, tf.maximum(labels, 0), mask)
        return self.cohort.train_step(images, labels)

    def _epoch_dataset(self, epoch):
        config, task = self.config, self.task
        # A seed per epoch: a resumed run draws the data order its epoch would have had.
        seed = config.seed * 100003 + epoch
        views = self.cohort.num_peers if config.per_peer_augmentation else 1
        if self.cohort.distributed:
            replica_batch = distribute.replica_batch_size(config.batch_size, self.strategy)
            # Each input pipeline batches its replicas' share; with several workers it reads
            # its own shard of the batches.
            return self.strategy.distribute_datasets_from_function(
                lambda ctx: task.train_dataset(replica_batch, seed=seed, views=views)
                .shard(ctx.num_input_pipelines, ctx.input_pipeline_id))
        return task.train_dataset(config.batch_size, seed=seed, views=views)

    def _close_epoch(self, epoch, steps, means, last, next_position):
        """Summaries and (when due) the evaluation of a trained epoch, then its checkpoint."""
        config = self.config
        train_metrics = means.train_metrics()
        with self.writer.as_default(step=self.global_step):
            for key, value in (train_metrics | getattr(self.cohort.method, "summaries", dict)()).items():
                tf.summary.scalar(key, value)
            for k, opt in enumerate(self.cohort.optimizers, start=1):
                tf.summary.scalar(f"lr/peer{k}", float(opt.learning_rate.numpy()))
            self._check_collapse(epoch, train_metrics)
            if last or (epoch + 1) % config.eval_every_epochs == 0:
                test_metrics = self.task.evaluate(self.cohort, config.eval_batch_size)
                if self.stop.signum is not None:  # the epoch is trained: resume re-evaluates it
                    self.save(epoch, steps, means, closed=False)
                    raise self.stop.interrupted(f"stopped while evaluating epoch {epoch + 1}",
                                                self.checkpoint_dir)
                for key, value in test_metrics.items():
                    tf.summary.scalar(key, value)
                print("  " + "  ".join(f"{k}={v:.4f}" for k, v in test_metrics.items()
                                       if k.rsplit("/", 1)[-1] in self.task.headline_metrics))
                self.results = train_metrics | test_metrics
        self.writer.flush()
        if last:
            self._write_results()
        self.save(*next_position, _EpochMeans() if next_position[1] == 0 else means, closed=True)

    def _check_collapse(self, epoch, train_metrics):
        """Warns of (or, with --on_collapse=stop, stops at) a cohort of uniform predictors."""
        found = collapse.collapsed_peers(train_metrics, self.task.num_classes,
                                         self.cohort.num_peers, prefix="train/")
        tf.summary.scalar("train/collapsed", float(bool(found)))
        if not found:
            return
        message = collapse.describe(found, self.task.num_classes, epoch + 1,
                                    "try --warmup_epochs=2 or a lower --learning_rate")
        if self.config.on_collapse == "stop":
            self.writer.flush()
            raise UserError(f"{message[:-1]}; training stopped and the last checkpoint in "
                            f"{self.checkpoint_dir} is kept (--on_collapse=warn to go on).")
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def _write_results(self):
        """results.json, only for a cohort whose weights and metrics are all finite."""
        broken = self.cohort.nonfinite_peers()
        bad_metrics = sorted(k for k, v in self.results.items() if not math.isfinite(v))
        if broken or bad_metrics:
            what = (f"peer {', '.join(map(str, broken))}'s weights" if broken
                    else f"the metrics {', '.join(bad_metrics[:3])}")
            kept = self.manager.latest_checkpoint
            kept = f"the last checkpoint, {kept}, is kept" if kept else "no checkpoint was written"
            raise UserError(f"Training diverged: {what} are not finite; results.json and the "
                            f"export are not written and {kept}: lower --learning_rate and pass "
                            "--overwrite to train again.")
        if self.chief:
            self.folder.write_json("results.json", self.results)

    def finish(self, trained):
        """The final results and export; a finished run run again changes nothing."""
        if not self.chief:  # the scratch copies only existed because saving is collective
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        if not trained:
            self.results = self._finished_results()
        if self.config.export and self.chief:
            self._export()
        return self.results

    def _finished_results(self):
        path = self.folder.join("results.json")
        try:
            with open(path) as f:
                results = json.load(f)
            print(f"{self.config.model_dir} holds a finished run: nothing to train (raise "
                  "--epochs to train on, or pass --overwrite to train again).")
            return results
        except (OSError, ValueError):
            print(f"{self.config.model_dir} holds a finished run without its results.json: "
                  "evaluating the last checkpoint (results carry no train/* metrics).")
        self.results = self.task.evaluate(self.cohort, self.config.eval_batch_size)
        self._write_results()
        return self.results

    def _export(self):
        export_dir = self.folder.join("export")
        source = os.path.basename(self.manager.latest_checkpoint or "")
        if export.is_complete(export_dir, source=source):
            return
        export.export_cohort(self.cohort, export_dir, self.task.preprocess,
                             serving_shape=self.task.serving_shape,
                             check_images=self.task.export_sample(), source=source)
        print(f"Exported: {export_dir}/{{{','.join(f'peer{k}' for k in range(1, self.cohort.num_peers + 1))},ensemble}}")
        if self.stop.signum is not None:
            raise self.stop.interrupted("stopped after the export finished (the run is complete)",
                                        self.checkpoint_dir)
