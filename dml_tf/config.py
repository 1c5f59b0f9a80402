"""Flags shared by the run scripts, and the frozen configuration they turn into.

Library code takes a `Config`; only run_*.py (through dml_tf.cli) read absl flags (docs/design.md).
This module imports no TensorFlow, so that flags are defined and checked in a second:
`config_from_flags` checks everything that needs no library module, `check_against_library`
(which imports the method's and the networks' modules) the rest.
"""

import dataclasses
import json
import math
import numbers
import re

from absl import flags

from dml_tf import collapse, methods, nets
from dml_tf.choices import (DISTRIBUTIONS, OPTIMIZERS, PLACEMENTS, PRECISIONS, SEMI_SUPERVISED,
                            UPDATES)
from dml_tf.errors import UserError

# Network options the cohort sets per peer itself (the Keras model name "peer{k}").
RESERVED_NET_ARGS = ("name",)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on; written to `model_dir/flags.json`."""

    # Data (defined by each run script: the datasets differ).
    dataset: str = "cifar100"
    data_dir: str | None = None
    tfds_data_dir: str | None = None
    image_size: tuple = ()  # (H, W) where the dataset resizes (Market-1501, ImageNet)
    labelled_fraction: float = 1.0  # CIFAR semi-supervised: labelled share of each class
    labelled_ids: int = 0  # Market-1501 semi-supervised: the first M identities labelled; 0 = all
    multiquery_pooling: str = "mean"  # Market-1501 multi-query: pooling of gt_bbox features
    # Cohort and method.
    nets: tuple = ("resnet32", "resnet32")
    net_args: tuple = ()
    method: str = "dml"
    method_args: tuple = ()
    update: str = "sequential"
    semi_supervised: str = "none"
    per_peer_augmentation: bool = False
    val_fraction: float = 0.1
    init: str = "scratch"
    init_checkpoint: str | None = None
    teacher_checkpoint: str | None = None
    teacher_peer: int = 1
    distribution: str = "none"
    peer_placement: str = "replicated"
    # Schedule (paper Sec. 4.1, CIFAR setting by default).
    epochs: int = 200
    steps_per_epoch: int | None = None
    train_steps: int | None = None
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    lr_decay_rate: float = 0.1
    lr_decay_epochs: float = 60.0
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    epsilon: float = 1e-7
    rmsprop_decay: float = 0.9
    weight_decay: float = 5e-4
    # Run.
    seed: int = 0
    model_dir: str = "runs/default"
    eval_every_epochs: int = 1
    export: bool = True
    jit_compile: bool = False
    precision: str = "float32"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    deterministic: bool = False
    on_nan: str = "stop"
    on_collapse: str = "warn"
    overwrite: bool = False
    checkpoint_every_steps: int = 0

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def define_flags(flag_values=flags.FLAGS):
    """Defines the flags every run script shares (dataset flags are the script's own), in the
    groups that `--help` shows (dml_tf.cli.HELP_GROUPS)."""
    defaults = Config()
    for define_group in (_define_cohort_flags, _define_schedule_flags, _define_run_flags):
        define_group(defaults, flag_values)


def _define_cohort_flags(d, f):
    """The cohort, its method and how it is spread over devices."""
    flags.DEFINE_string("nets", ",".join(d.nets),
                        "Comma-separated networks of the cohort, peer 1 first, from "
                        f"{', '.join(nets.NAMES)}; 'resnet32x3' means three resnet32 peers.",
                        flag_values=f)
    flags.DEFINE_string("net_args", "", "Network keyword arguments for every peer, "
                        "e.g. 'dropout=0.3' (WRN).", flag_values=f)
    flags.DEFINE_enum("method", d.method, list(methods.NAMES),
                      "Training method (docs/methods.md): independent, dml (Eq. 10), dml_js (Eq. 7), "
                      "dml_e (Eq. 11), ...", flag_values=f)
    flags.DEFINE_string("method_args", "", "Method hyperparameters, e.g. 'label_smoothing=0.1'.",
                        flag_values=f)
    flags.DEFINE_enum("update", d.update, list(UPDATES),
                      "sequential: Algorithm 1, peer k+1 learns from the updated peer k; "
                      "simultaneous: all peers updated from one forward pass.", flag_values=f)
    flags.DEFINE_enum("semi_supervised", d.semi_supervised, list(SEMI_SUPERVISED),
                      "none: every label used; labelled_only: train on the labelled examples "
                      "only; dml_all: cross-entropy on labelled examples, mimicry on all "
                      "(paper Sec. 3.4). The labelled share is --labelled_fraction (CIFAR) or "
                      "--labelled_ids (Market-1501).", flag_values=f)
    flags.DEFINE_bool("per_peer_augmentation", d.per_peer_augmentation,
                      "Each peer sees its own random augmentation of the same images (KDCL).",
                      flag_values=f)
    flags.DEFINE_float("val_fraction", d.val_fraction,
                       "Share of the training set held out for methods that estimate on a "
                       "validation split every epoch (kdcl_general).", flag_values=f)
    flags.DEFINE_string("teacher_checkpoint", None,
                        "kd: the fixed teacher (peer 1): a finished run's --model_dir or a "
                        "checkpoint prefix in one; its --teacher_peer is restored.", flag_values=f)
    flags.DEFINE_integer("teacher_peer", d.teacher_peer,
                         "kd: which peer of the teacher run is the teacher (from 1).", flag_values=f)
    flags.DEFINE_enum("distribution", d.distribution, list(DISTRIBUTIONS),
                      "none; mirrored: MirroredStrategy over the local devices, each replica "
                      "holding the whole cohort, the global batch split; multi_worker: "
                      "MultiWorkerMirroredStrategy from TF_CONFIG.", flag_values=f)
    flags.DEFINE_enum("peer_placement", d.peer_placement, list(PLACEMENTS),
                      "per_device: peer k on device k mod n, only probabilities cross devices "
                      "(paper Sec. 4.5); implies --update=simultaneous.", flag_values=f)


def _define_schedule_flags(d, f):
    """Training length, batches, optimiser, learning rate and its schedule, seed."""
    flags.DEFINE_integer("epochs", d.epochs, "Training epochs.", flag_values=f)
    flags.DEFINE_integer("train_steps", None, "Budget in steps (e.g. the released Market-1501 "
                         "code's 200k); overrides --epochs: as many epochs as it takes, the last "
                         "one cut short.", flag_values=f)
    flags.DEFINE_integer("steps_per_epoch", None, "Cap on the steps of an epoch (quick runs); "
                         "default: one pass over the training set.", flag_values=f)
    flags.DEFINE_integer("batch_size", d.batch_size, "Mini-batch size (every peer sees the same batch).",
                         flag_values=f)
    flags.DEFINE_integer("eval_batch_size", d.eval_batch_size, "Batch size for evaluation.",
                         flag_values=f)
    flags.DEFINE_enum("optimizer", d.optimizer, list(OPTIMIZERS),
                      "sgd (CIFAR), adam (Market-1501), rmsprop (ImageNet).", flag_values=f)
    flags.DEFINE_float("learning_rate", d.learning_rate, "Initial learning rate.", flag_values=f)
    flags.DEFINE_float("lr_decay_rate", d.lr_decay_rate,
                       "Learning rate multiplied by this every --lr_decay_epochs (staircase).",
                       flag_values=f)
    flags.DEFINE_float("lr_decay_epochs", d.lr_decay_epochs,
                       "Epochs between learning-rate decays; 0 keeps it constant.", flag_values=f)
    flags.DEFINE_float("warmup_epochs", d.warmup_epochs,
                       "Linear learning-rate warm-up over this many epochs, multiplying the "
                       "staircase schedule (Goyal et al. 2017); 0 (off) in every paper flagfile: "
                       "a deviation from the paper, for short runs whose first steps blow up.",
                       flag_values=f)
    flags.DEFINE_float("momentum", d.momentum, "SGD / RMSProp momentum.", flag_values=f)
    flags.DEFINE_bool("nesterov", d.nesterov, "Nesterov momentum for SGD.", flag_values=f)
    flags.DEFINE_float("adam_beta1", d.adam_beta1, "Adam β1.", flag_values=f)
    flags.DEFINE_float("adam_beta2", d.adam_beta2, "Adam β2.", flag_values=f)
    flags.DEFINE_float("epsilon", d.epsilon, "Adam / RMSProp ε.", flag_values=f)
    flags.DEFINE_float("rmsprop_decay", d.rmsprop_decay, "RMSProp decay ρ.", flag_values=f)
    flags.DEFINE_float("weight_decay", d.weight_decay,
                       "L2 coefficient λ: adds λ/2·Σ‖W‖² over kernels (= PyTorch SGD weight_decay).",
                       flag_values=f)
    flags.DEFINE_integer("seed", d.seed, "Seed of initialisation, data order and augmentation.",
                         flag_values=f)


def _define_run_flags(d, f):
    """The run folder, evaluation, export, numerics, threads and reliability."""
    flags.DEFINE_string("model_dir", d.model_dir, "Output folder: flags.json, TensorBoard events, "
                        "checkpoints (resumed automatically), results.json, export/.", flag_values=f)
    flags.DEFINE_integer("eval_every_epochs", d.eval_every_epochs,
                         "Evaluate on the test split every this many epochs (and at the end).",
                         flag_values=f)
    flags.DEFINE_bool("export", d.export, "Write SavedModels to model_dir/export/peer{k} and "
                      "export/ensemble at the end.", flag_values=f)
    flags.DEFINE_bool("jit_compile", d.jit_compile, "Compile the cohort step with XLA. Off by "
                      "default: on the CPU it measured slower (bench/RESULTS.md); try it on GPUs.",
                      flag_values=f)
    flags.DEFINE_enum("precision", d.precision, list(PRECISIONS),
                      "float32; mixed_bfloat16: layers in bfloat16, variables, logits, softmax "
                      "and losses in float32 (CPUs with AVX-512 BF16/AMX, TPUs); mixed_float16: "
                      "the same in float16 with dynamic loss scaling (GPUs).", flag_values=f)
    flags.DEFINE_integer("intra_op_threads", d.intra_op_threads, "Threads inside one op (0: "
                         "TensorFlow's choice, one per core).", flag_values=f)
    flags.DEFINE_integer("inter_op_threads", d.inter_op_threads, "Ops run at once, e.g. the "
                         "peers' forward passes (0: TensorFlow's choice).", flag_values=f)
    flags.DEFINE_bool("deterministic", d.deterministic, "TensorFlow op determinism: with the seeded "
                      "data order and augmentation, a resumed run ends with the weights of an "
                      "uninterrupted one (slower on GPUs).", flag_values=f)
    flags.DEFINE_enum("on_collapse", d.on_collapse, list(collapse.ON_COLLAPSE),
                      "After an epoch in which every peer's mean predictive entropy is above "
                      "95% of log M and its cross-entropy near log M (a cohort collapsed to "
                      "uniform predictions): warn (one line, and train/collapsed in "
                      "TensorBoard) or stop (keeping the last checkpoint).", flag_values=f)
    flags.DEFINE_enum("on_nan", d.on_nan, ["stop", "skip"], "A NaN/Inf loss: stop (keeping the "
                      "last checkpoint) or skip that peer's update, counted in TensorBoard as "
                      "train/peer{k}/skipped_steps.", flag_values=f)
    flags.DEFINE_bool("overwrite", d.overwrite, "Replace a --model_dir that holds a run of "
                      "another configuration (otherwise refused).", flag_values=f)
    flags.DEFINE_integer("checkpoint_every_steps", d.checkpoint_every_steps, "Also checkpoint "
                         "every N steps inside an epoch (0: at epoch ends only; SIGINT/SIGTERM "
                         "always checkpoint the exact position).", flag_values=f)


def parse_nets(spec):
    """'resnet32,mobilenet' -> ('resnet32', 'mobilenet'); 'resnet32x3' -> three resnet32."""
    result = []
    for item in (s.strip() for s in spec.split(",")):
        match = re.fullmatch(r"(.+)x(\d+)", item)
        if item not in nets.NAMES and match and match.group(1) in nets.NAMES:
            if int(match.group(2)) < 1:
                raise UserError(f"--nets names '{item}', zero {match.group(1)} peers; give a "
                                f"count of at least 1 (e.g. {match.group(1)}x2).")
            result.extend([match.group(1)] * int(match.group(2)))
        elif item in nets.NAMES:
            result.append(item)
        else:
            raise UserError(f"--nets names '{item}', which is not a network; choose from "
                            f"{', '.join(nets.NAMES)} (e.g. --nets=resnet32,mobilenet or resnet32x3).")
    return tuple(result)


def _parse_value(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_keyword_args(spec, flag_name):
    """'a=1,b=0.5' -> (('a', 1), ('b', 0.5)), hashable for the frozen config."""
    pairs = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--{flag_name}='{spec}' is not of the form name=value,name=value.")
        pairs.append((key.strip(), _parse_value(value.strip())))
    return tuple(pairs)


def parse_image_size(spec):
    """'224' -> (224, 224); '256,128' -> (256, 128) (height, width)."""
    if isinstance(spec, (tuple, list)):
        return tuple(int(v) for v in spec)
    try:
        sizes = tuple(int(v) for v in str(spec).split(","))
    except ValueError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 32:
        raise UserError(f"--image_size={spec} must be 'S' or 'H,W' with sides of at least 32 pixels.")
    return sizes


def validate(config):
    """Raises UserError naming the flag for values no run can use (no library module needed)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):  # absl parses "nan", "inf"
            raise UserError(f"--{field.name} must be a finite number, got {value}.")
    positive = ("epochs", "batch_size", "eval_batch_size", "learning_rate", "eval_every_epochs",
                "steps_per_epoch", "train_steps", "teacher_peer")
    for name in positive:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be positive, got {value}.")
    non_negative = ("seed", "weight_decay", "checkpoint_every_steps", "labelled_ids",
                    "warmup_epochs")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise UserError(f"--{name} must be 0 or positive, got {getattr(config, name)}.")
    for name in ("intra_op_threads", "inter_op_threads"):
        if getattr(config, name) < 0:
            raise UserError(f"--{name} must be 0 (TensorFlow's choice) or positive, got "
                            f"{getattr(config, name)}.")
    if not 0.0 < config.labelled_fraction <= 1.0:
        raise UserError(f"--labelled_fraction must be in (0, 1], got {config.labelled_fraction}.")
    if not 0.0 < config.val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in (0, 1), got {config.val_fraction}.")
    for key, _ in config.net_args:
        if key in RESERVED_NET_ARGS:
            raise UserError(f"--net_args sets '{key}', which the cohort sets for every peer "
                            f"itself; drop it from --net_args.")
    _validate_combinations(config)
    return config


def _validate_combinations(config):
    if config.semi_supervised == "dml_all" and len(config.nets) < 2:
        raise UserError("--semi_supervised=dml_all learns from unlabelled examples through the "
                        "mimicry loss: list at least two --nets.")
    if config.distribution != "none" and config.peer_placement == "per_device":
        raise UserError("--peer_placement=per_device places whole peers on devices; combine it "
                        "with --distribution=none, not with data parallelism.")
    if config.distribution != "none" and config.semi_supervised == "dml_all":
        raise UserError("--semi_supervised=dml_all runs on one device; drop --distribution.")
    if config.on_nan == "skip" and config.distribution != "none":
        raise UserError("--on_nan=skip runs on one device; use --on_nan=stop with --distribution.")
    if config.train_steps is None and config.warmup_epochs >= config.epochs:
        # A warm-up as long as the run never reaches --learning_rate: a typo, not a schedule.
        raise UserError(f"--warmup_epochs={config.warmup_epochs:g} is not shorter than --epochs="
                        f"{config.epochs}, so the learning rate would never reach "
                        f"--learning_rate; give fewer warm-up epochs.")


def check_against_library(config):
    """Checks --method, --method_args and --net_args against the method's and networks' own
    arguments; raises UserError naming the flag.

    Imports the method's and the networks' modules, hence TensorFlow: call it after
    `config_from_flags` (which needs neither), before anything is trained or written.
    """
    accepted = methods.hyperparameters(config.method)
    for key, value in config.method_args:
        if key not in accepted:
            raise UserError(f"--method_args names {key}, which --method={config.method} does not "
                            f"take; it takes {', '.join(sorted(accepted)) or 'none'}.")
        if _is_number(accepted[key]) and not _is_number(value):
            raise UserError(f"--method_args {key}={value} must be a number (--method="
                            f"{config.method}'s default is {accepted[key]}).")
    try:
        method = methods.get(config.method, **dict(config.method_args))
    except UserError as e:
        raise UserError(f"--method_args={_keyword_spec(config.method_args)} is refused: "
                        f"{e}") from None
    if len(config.nets) < method.min_peers:
        raise UserError(
            f"--method={config.method} needs at least {method.min_peers} networks in --nets, "
            f"got {len(config.nets)}; list more (e.g. --nets=resnet32,resnet32 or "
            f"--nets=resnet32x{method.min_peers}).")
    for net in dict.fromkeys(config.nets):
        options = nets.options(net)
        unknown = [key for key, _ in config.net_args if key not in options]
        if unknown:
            raise UserError(f"--net_args sets {', '.join(unknown)}, which --nets' {net} does not "
                            f"take; it takes {', '.join(options) or 'no options'}.")
    return config


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _keyword_spec(pairs):
    return ",".join(f"{key}={value}" for key, value in pairs)


def config_from_flags(flag_values, **fixed):
    """Builds the Config from parsed flags (every Config field that is a flag), checked by
    `validate`; `check_against_library` checks the rest.

    `fixed` sets fields a run script does not expose as flags (e.g. dataset="market1501").
    """
    values = dict(fixed)
    for field in dataclasses.fields(Config):
        if field.name in flag_values:
            values[field.name] = flag_values[field.name].value
    values["nets"] = parse_nets(values.get("nets", ",".join(Config.nets)))
    values["net_args"] = parse_keyword_args(values.get("net_args", ""), "net_args")
    values["method_args"] = parse_keyword_args(values.get("method_args", ""), "method_args")
    if "image_size" in values:
        values["image_size"] = parse_image_size(values["image_size"])
    return validate(Config(**values))
