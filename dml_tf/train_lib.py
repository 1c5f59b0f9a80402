"""train_and_evaluate: config -> data -> cohort -> the epoch loop, summaries, results, export.

Everything a run writes goes to `config.model_dir`, whose life (checks, lock, --overwrite,
atomic writes) is dml_tf.run_dir's and whose checkpoints (resume with fallback) are
dml_tf.checkpoints'; a model_dir that holds a checkpoint is resumed, a finished one is left
as it is.
"""

import json
import math
import os
import shutil
import sys
import time

import keras
import tensorflow as tf

from dml_tf import checkpoints, distribute, epochs, export, lifecycle, methods, progress, run_dir
from dml_tf import tasks
from dml_tf.errors import UserError
# The cohort of a Config and its checkpoints (also what analysis restores).
from dml_tf.run_cohort import (build_cohort, checkpoint_trackables, load_config, load_teacher,  # noqa: F401
                               make_checkpoint, restore_checkpoint, restore_cohort)

Interrupted = epochs.Interrupted  # what the run scripts catch: SIGINT/SIGTERM, position saved


def _check_finite(step_metrics, num_peers, step, model_dir, on_nan):
    for k in range(1, num_peers + 1):
        value = step_metrics[f"peer{k}/loss"]
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
    replacing = run_dir.check(config)  # before the data load: a refused run leaves nothing
    _set_threads(config)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        # Same seed, same ops order: a resumed run ends with the uninterrupted run's weights.
        tf.config.experimental.enable_op_determinism()
    task = (task or tasks.make(config)).semi_supervised(config.semi_supervised, config)
    held_out = None
    if methods.method_class(config.method).needs_validation:
        task, held_out = task.split_validation(config.val_fraction, config.seed)
    schedule = epochs.Schedule(config, task.num_train)
    strategy = distribute.make_strategy(config.distribution)
    cohort = build_cohort(config, task.num_classes, task.input_shape, schedule.steps_per_epoch,
                          strategy)
    method_lifecycle = lifecycle.MethodLifecycle(
        cohort.method, cohort.models, task.num_classes, on_collapse=config.on_collapse,
        collapse_fix="try --warmup_epochs=2 or a lower --learning_rate")
    lifecycle.check_inputs(
        cohort.method, teacher=bool(config.teacher_checkpoint), held_out=held_out is not None,
        teacher_hint="pass --teacher_checkpoint at the teacher run's --model_dir",
        held_out_hint="raise --val_fraction above 0")
    # A fresh run's teacher is loaded before the folder is taken: a refused one leaves nothing.
    fresh = replacing or not checkpoints.prefixes(os.path.join(config.model_dir, "checkpoints"))
    if fresh:
        method_lifecycle.load_teacher(lambda model, index: load_teacher(model, config))
    started = time.time()
    with run_dir.RunDir(config, owner=distribute.is_chief(strategy)) as folder, \
            epochs.StopRequests() as stop:
        run = _Run(config, task, cohort, folder, strategy, stop, held_out, method_lifecycle)
        run.restore_or_start(schedule, teacher_loaded=fresh)
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


class _Run:
    """One training run in its folder: checkpoints, summaries, the epoch loop, the final writes."""

    def __init__(self, config, task, cohort, folder, strategy, stop, held_out, method_lifecycle):
        self.config, self.task, self.cohort, self.folder = config, task, cohort, folder
        self.strategy, self.stop, self.held_out = strategy, stop, held_out
        self.lifecycle = method_lifecycle
        self.chief = folder.owner
        self.trackables = checkpoint_trackables(cohort)
        self.state = self.trackables  # epoch, step_in_epoch, epoch_means, closed
        self.checkpoint = tf.train.Checkpoint(**self.trackables)
        # Every multi-worker process saves (saving is collective), the chief into model_dir and
        # the others into a scratch folder of their own that is never read.
        self.checkpoint_dir = folder.join("checkpoints") if self.chief else folder.join(
            f"worker_scratch_{strategy.cluster_resolver.task_id}")
        self.manager = None
        self._writer = None
        self.results = {}

    def restore_or_start(self, schedule, teacher_loaded):
        try:
            restored = restore_checkpoint(self.cohort, self.trackables, self.checkpoint_dir)
        except UserError:
            if not (self.config.overwrite and self.chief):
                raise
            # --overwrite is the way out of a run whose checkpoints are all damaged.
            self.folder.remove_run_files()
            restored = None
        self.manager = checkpoints.manager(self.checkpoint, self.checkpoint_dir)
        if not restored and not teacher_loaded:
            self.lifecycle.load_teacher(lambda model, index: load_teacher(model, self.config))
        elif restored and not self._finished(schedule):
            print(f"Resumed from {restored} (epoch {self._value('epoch') + 1}, step "
                  f"{self._value('step_in_epoch')} of it; global step {self.cohort.steps_done}).")
        if self.chief:
            self.folder.write_json("flags.json", json.loads(self.config.to_json()))

    def _value(self, name):
        return int(self.state[name].numpy())

    def _finished(self, schedule):
        epoch = self._value("epoch")
        return epoch >= schedule.epochs or (
            epoch == schedule.epochs - 1 and bool(self.state["closed"].numpy())
            and self._value("step_in_epoch") >= schedule.steps(epoch))

    @property
    def writer(self):
        """Created on first use: a finished run run again adds no empty event file."""
        if self._writer is None:
            self._writer = (tf.summary.create_file_writer(self.config.model_dir) if self.chief
                            else tf.summary.create_noop_writer())
        return self._writer

    def save(self, epoch, step_in_epoch, means, closed):
        for name, value in (("epoch", epoch), ("step_in_epoch", step_in_epoch),
                            ("epoch_means", means.state()), ("closed", closed)):
            self.state[name].assign(value)
        checkpoints.save(self.manager, self.cohort.steps_done)  # a full disk: one sentence

    def train(self, schedule):
        """Trains and closes the epochs still to do; returns how many were closed (0: finished)."""
        start, skip = self._value("epoch"), self._value("step_in_epoch")
        means = epochs.EpochMeans(self.state["epoch_means"].numpy().decode() if skip else None)
        closed = 0
        for epoch in range(start, schedule.epochs):
            steps = schedule.steps(epoch)
            if skip >= steps and bool(self.state["closed"].numpy()):  # a budget that ended here
                skip, means = 0, epochs.EpochMeans()
                continue
            last = epoch + 1 == schedule.epochs
            if skip < steps:
                self._train_epoch(epoch, schedule.epochs, steps, skip, means)
            self._close_epoch(epoch, steps, means, last,
                              next_position=(epoch, steps) if steps < schedule.steps_per_epoch
                              else (epoch + 1, 0))
            closed += 1
            skip, means = 0, epochs.EpochMeans()
        return closed

    def _train_epoch(self, epoch, num_epochs, steps, skip, means):
        config, cohort = self.config, self.cohort
        self.lifecycle.begin_epoch(lambda: self.task.predict_probabilities(
            cohort, *self.held_out, config.eval_batch_size))
        bar = progress.EpochProgress(epoch, num_epochs, steps, cohort.num_peers,
                                     config.batch_size, first_step=skip)
        batches = tasks.diagnosed(self.task, _epoch_dataset(self, epoch))
        for _ in range(skip):  # resume mid-epoch: the same batches, already trained on
            next(batches)
        for step in range(skip + 1, steps + 1):
            step_metrics = {k: float(v) for k, v in self._step(*next(batches)).items()}
            _check_finite(step_metrics, cohort.num_peers, cohort.steps_done, config.model_dir,
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

    def _close_epoch(self, epoch, steps, means, last, next_position):
        """Summaries and (when due) the evaluation of a trained epoch, then its checkpoint."""
        config = self.config
        train_metrics = means.train_metrics()
        shared, stop = self.lifecycle.end_epoch(epoch, train_metrics, self.cohort.steps_done,
                                                prefix="train/")
        with self.writer.as_default(step=self.cohort.steps_done):
            for key, value in (train_metrics | shared).items():
                tf.summary.scalar(key, value)
            for k, opt in enumerate(self.cohort.optimizers, start=1):
                tf.summary.scalar(f"lr/peer{k}", float(opt.learning_rate.numpy()))
            if stop:
                self.writer.flush()
                raise UserError(f"{stop[:-1]}; training stopped and {self._kept()} "
                                "(--on_collapse=warn to go on).")
            if last or (epoch + 1) % config.eval_every_epochs == 0:
                # The trained epoch first: an evaluation that fails (a damaged test image)
                # must not cost it; resume re-evaluates an unclosed position. A diverged
                # cohort is never checkpointed (_write_results refuses it after evaluation).
                if not self.cohort.nonfinite_peers():
                    self.save(epoch, steps, means, closed=False)
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
            _write_results(self)
        self.save(*next_position, epochs.EpochMeans() if next_position[1] == 0 else means,
                  closed=True)

    def _kept(self):
        """What a stop keeps: the last checkpoint where one was written."""
        kept = self.manager.latest_checkpoint
        return f"the last checkpoint, {kept}, is kept" if kept else "no checkpoint was written yet"

    def finish(self, trained):
        """The final results and export; a finished run run again changes nothing."""
        if not self.chief:  # the scratch copies only existed because saving is collective
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        if not trained:
            self.results = _finished_results(self)
        if self.config.export and self.chief:
            _export(self)
        return self.results


def _epoch_dataset(run, epoch):
    config, task = run.config, run.task
    # A seed per epoch: a resumed run draws the data order its epoch would have had.
    seed = config.seed * 100003 + epoch
    views = run.cohort.num_peers if config.per_peer_augmentation else 1
    if run.cohort.distributed:
        replica_batch = distribute.replica_batch_size(config.batch_size, run.strategy)
        # Each input pipeline batches its replicas' share; with several workers it reads
        # its own shard of the batches.
        return run.strategy.distribute_datasets_from_function(
            lambda ctx: without_autotune(task.train_dataset(replica_batch, seed=seed, views=views)
                                         .shard(ctx.num_input_pipelines, ctx.input_pipeline_id)))
    return without_autotune(task.train_dataset(config.batch_size, seed=seed, views=views))


def without_autotune(dataset):
    """`dataset` with tf.data's autotuning model switched off.

    Each epoch iterates a new dataset, and deleting the previous epoch's iterator with the
    autotuning model on stalled for 0.8-20 s in half of the epochs (TF 2.21, ResNet-32 pair
    on 2 cores: bench/RESULTS.md), 25 % of a run's wall time; with it off, never, at the same
    step speed. AUTOTUNE parallelism then stays at its initial value.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def _write_results(run):
    """results.json, only for a cohort whose weights and metrics are all finite."""
    broken = run.cohort.nonfinite_peers()
    bad_metrics = sorted(k for k, v in run.results.items() if not math.isfinite(v))
    if broken or bad_metrics:
        what = (f"peer {', '.join(map(str, broken))}'s weights" if broken
                else f"the metrics {', '.join(bad_metrics[:3])}")
        raise UserError(f"Training diverged: {what} are not finite; results.json and the "
                        f"export are not written and {run._kept()}: lower --learning_rate and "
                        "pass --overwrite to train again.")
    if run.chief:
        run.folder.write_json("results.json", run.results)


def _finished_results(run):
    path = run.folder.join("results.json")
    try:
        with open(path) as f:
            results = json.load(f)
        print(f"{run.config.model_dir} holds a finished run: nothing to train (raise "
              "--epochs to train on, or pass --overwrite to train again).")
        return results
    except (OSError, ValueError):
        print(f"{run.config.model_dir} holds a finished run without its results.json: "
              "evaluating the last checkpoint (results carry no train/* metrics).")
    run.results = run.task.evaluate(run.cohort, run.config.eval_batch_size)
    _write_results(run)
    return run.results


def _export(run):
    export_dir = run.folder.join("export")
    source = os.path.basename(run.manager.latest_checkpoint or "")
    if export.is_complete(export_dir, source=source):
        return
    export.export_cohort(run.cohort, export_dir, run.task.preprocess,
                         serving_shape=run.task.serving_shape,
                         check_images=run.task.export_sample(), source=source)
    print(f"Exported: {export_dir}/{{{','.join(f'peer{k}' for k in range(1, run.cohort.num_peers + 1))},ensemble}}")
    if run.stop.signum is not None:
        raise run.stop.interrupted("stopped after the export finished (the run is complete)",
                                   run.checkpoint_dir)
