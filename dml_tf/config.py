"""The settings of a run, each defined once, and the frozen configuration they make.

`Config` is the table: each field's metadata (a `Setting`) gives its flag's help and --help
group, which run scripts define the flag, whether a resumed run may change it and its range
check. The absl flags (`define_flags`), --help's sections (`help_groups`), the settings a
resume may change (`resumable_settings`, read by dml_tf.run_dir) and `validate`'s range checks
all derive from it; a run script's defaults are overrides of the table's (e.g. run_market.py's
DEFAULTS).

Library code takes a `Config`; only run_*.py (through dml_tf.cli) read absl flags (docs/design.md).
This module imports no TensorFlow, so that flags are defined and checked in a second:
`config_from_flags` checks everything that needs no library module, `check_against_library`
(which imports the method's and the networks' modules) the rest.
"""

import dataclasses
import functools
import json
import math
import numbers
import re
import typing

from absl import flags

from dml_tf import choices, collapse, methods, nets
from dml_tf.errors import UserError

# Network options the cohort sets per peer itself (the Keras model name "peer{k}").
RESERVED_NET_ARGS = ("name",)
# The run scripts, which define the flags of the settings they take.
SCRIPTS = ("run_cifar.py", "run_market.py", "run_imagenet.py")
# --help's sections, in order.
DATA, COHORT, SCHEDULE, RUN = "data", "cohort and method", "schedule", "run and reliability"
GROUPS = (DATA, COHORT, SCHEDULE, RUN)


@dataclasses.dataclass(frozen=True)
class Range:
    """A range check: `holds(value)`, else "--name must be {words}, got value."."""

    holds: typing.Callable
    words: str


POSITIVE = Range(lambda v: v > 0, "positive")
NON_NEGATIVE = Range(lambda v: v >= 0, "0 or positive")
THREADS = Range(lambda v: v >= 0, "0 (TensorFlow's choice) or positive")
FRACTION = Range(lambda v: 0.0 < v <= 1.0, "in (0, 1]")
OPEN_FRACTION = Range(lambda v: 0.0 < v < 1.0, "in (0, 1)")


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the table says of one Config field, besides its name, type and default.

    Attributes:
      help: the flag's help; a {script: help} dict for a dataset's own setting, which only
        those scripts define (their datasets differ).
      group: the --help section (one of GROUPS).
      resumable: a resumed run may change it (run_dir refuses other changes without --overwrite).
      check: a Range for `validate`, or None.
      choices: the values its flag accepts (an enum flag), or None.
      parse: turns the flag's text into the field's value (tuples), or None.
    """

    help: str | dict
    group: str
    resumable: bool = False
    check: Range | None = None
    choices: tuple | None = None
    parse: typing.Callable | None = None

    def scripts(self):
        return tuple(self.help) if isinstance(self.help, dict) else SCRIPTS


def _setting(default, help, group, **kwargs):  # noqa: A002 (the flag's help)
    return dataclasses.field(default=default, metadata={"setting": Setting(help, group, **kwargs)})


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


def flag_text(value):
    """A setting's value as its flag is written: tuples comma-joined, booleans true/false."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(f"{item[0]}={item[1]}" if isinstance(item, tuple) else str(item)
                        for item in value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on; written to `model_dir/flags.json`.

    Each field is a setting of the table (its metadata: a `Setting`), listed by --help group.
    """

    # Data; the dataset's own settings are flags of the scripts of that dataset only.
    dataset: str = _setting(
        "cifar100", {"run_cifar.py": "cifar10 / cifar100 (paper Table 2), digits (scikit-learn's "
                     "bundled 8x8 digits upsampled to 32x32: offline, for the quickstart) or npz "
                     "(uint8 x_train/x_test and y_train/y_test arrays in the .npz file "
                     "--data_dir)."},
        DATA, choices=choices.CIFAR_DATASETS)
    data_dir: str | None = _setting(None, {
        "run_cifar.py": "An extracted cifar-10-batches-bin or cifar-100-binary folder (the "
                        "original binary version, or its parent); unset: tensorflow-datasets "
                        "(downloads). With --dataset=npz: the .npz file.",
        "run_market.py": "The extracted Market-1501-v15.09.15 folder (or its parent) with "
                         "bounding_box_train, query, bounding_box_test and gt_bbox.",
        "run_imagenet.py": "A folder of TFRecord shards train-00000-of-01024 ... "
                           "validation-00127-of-00128 (build_imagenet_data.py layout); unset: "
                           "tensorflow-datasets imagenet2012, whose archives you download by "
                           "hand into <tfds_data_dir>/downloads/manual/."}, DATA, resumable=True)
    tfds_data_dir: str | None = _setting(None, {
        "run_cifar.py": "tensorflow-datasets data_dir (default ~/tensorflow_datasets).",
        "run_imagenet.py": "tensorflow-datasets data_dir."}, DATA, resumable=True)
    image_size: tuple = _setting((), {  # (H, W) where the dataset resizes
        "run_market.py": "H,W the crops are resized to (released code: 224x224; 256,128 keeps "
                         "Market's 2:1 aspect ratio).",
        "run_imagenet.py": "Side of the square training and evaluation crops."},
        DATA, parse=parse_image_size)
    labelled_fraction: float = _setting(
        1.0, {"run_cifar.py": "Semi-supervised (paper Fig. 6a): the seeded share of each class "
              "that keeps its label."}, DATA, check=FRACTION)
    labelled_ids: int = _setting(
        0, {"run_market.py": "Semi-supervised (paper Fig. 6b): the first M of the 751 training "
            "identities are labelled; 0 = all."}, DATA, check=NON_NEGATIVE)
    semi_supervised: str = _setting(
        "none", "none: every label used; labelled_only: train on the labelled examples only; "
        "dml_all: cross-entropy on labelled examples, mimicry on all (paper Sec. 3.4). The "
        "labelled share is --labelled_fraction (CIFAR) or --labelled_ids (Market-1501).",
        DATA, choices=choices.SEMI_SUPERVISED)
    label_offset: int = _setting(
        1, {"run_imagenet.py": "Subtracted from the TFRecords' image/class/label: 1 for "
            "build_imagenet_data.py's labels 1..1000, 0 for shards with 0-based labels "
            "(tensorflow-datasets' ImageNet is never shifted)."}, DATA, check=NON_NEGATIVE)
    multiquery_pooling: str = _setting(
        "mean", {"run_market.py": "Multi-query: pooling of a query identity's gt_bbox features "
                 "under its camera."}, DATA, choices=choices.MULTIQUERY_POOLINGS)
    per_peer_augmentation: bool = _setting(
        False, "Each peer sees its own random augmentation of the same images (KDCL).", DATA)
    val_fraction: float = _setting(
        0.1, "Share of the training set held out for methods that estimate on a validation "
        "split every epoch (kdcl_general).", DATA, check=OPEN_FRACTION)
    # Cohort and method.
    nets: tuple = _setting(
        ("resnet32", "resnet32"), "Comma-separated networks of the cohort, peer 1 first, from "
        f"{', '.join(nets.NAMES)}; 'resnet32x3' means three resnet32 peers.", COHORT,
        parse=parse_nets)
    net_args: tuple = _setting(
        (), "Network keyword arguments for every peer, e.g. 'dropout=0.3' (WRN).", COHORT,
        parse=functools.partial(parse_keyword_args, flag_name="net_args"))
    init: str = _setting("scratch", {
        "run_market.py": "Start from scratch or from Keras' ImageNet MobileNet weights "
                         "(downloaded once; paper Table 3 'pre?').",
        "run_imagenet.py": "scratch (the paper) or Keras' ImageNet weights."},
        COHORT, choices=choices.INITS)
    init_checkpoint: str | None = _setting(
        None, {"run_market.py": "A local Keras weights file (.h5) for the backbone, instead of "
               "--init=imagenet on a machine without network."}, COHORT)
    method: str = _setting(
        "dml", "Training method (docs/methods.md): independent, dml (Eq. 10), dml_js (Eq. 7), "
        "dml_e (Eq. 11), ...", COHORT, choices=methods.NAMES)
    method_args: tuple = _setting(
        (), "Method hyperparameters, e.g. 'label_smoothing=0.1'.", COHORT,
        parse=functools.partial(parse_keyword_args, flag_name="method_args"))
    update: str = _setting(
        "sequential", "sequential: Algorithm 1, peer k+1 learns from the updated peer k; "
        "simultaneous: all peers updated from one forward pass.", COHORT, choices=choices.UPDATES)
    teacher_checkpoint: str | None = _setting(
        None, "kd: the fixed teacher (peer 1): a finished run's --model_dir or a checkpoint "
        "prefix in one; its --teacher_peer is restored.", COHORT, resumable=True)
    teacher_peer: int = _setting(
        1, "kd: which peer of the teacher run is the teacher (from 1).", COHORT, check=POSITIVE)
    # Schedule (paper Sec. 4.1, CIFAR setting by default).
    epochs: int = _setting(
        200, "Training epochs; an explicit --epochs overrides a run script's default "
        "--train_steps (run_market.py's).", SCHEDULE, resumable=True, check=POSITIVE)
    train_steps: int | None = _setting(
        None, "Budget in steps (e.g. the released Market-1501 code's 200k): as many epochs as "
        "it takes, the last one cut short. It replaces --epochs, but a run script's default "
        "budget yields to an explicit --epochs; both given is refused; 0: no budget.",
        SCHEDULE, resumable=True, check=NON_NEGATIVE)
    steps_per_epoch: int | None = _setting(
        None, "Cap on the steps of an epoch (quick runs); default: one pass over the training "
        "set.", SCHEDULE, resumable=True, check=POSITIVE)
    batch_size: int = _setting(
        64, "Mini-batch size (every peer sees the same batch).", SCHEDULE, check=POSITIVE)
    eval_batch_size: int = _setting(
        256, "Batch size for evaluation.", SCHEDULE, resumable=True, check=POSITIVE)
    optimizer: str = _setting(
        "sgd", "sgd (CIFAR), adam (Market-1501), rmsprop (ImageNet).", SCHEDULE,
        choices=choices.OPTIMIZERS)
    learning_rate: float = _setting(0.1, "Initial learning rate.", SCHEDULE, check=POSITIVE)
    lr_decay_rate: float = _setting(
        0.1, "Learning rate multiplied by this every --lr_decay_epochs (staircase).", SCHEDULE)
    lr_decay_epochs: float = _setting(
        60.0, "Epochs between learning-rate decays; 0 keeps it constant.", SCHEDULE)
    warmup_epochs: float = _setting(
        0.0, "Linear learning-rate warm-up over this many epochs, multiplying the staircase "
        "schedule (Goyal et al. 2017); 0 (off) in every paper flagfile: a deviation from the "
        "paper, for short runs whose first steps blow up.", SCHEDULE, check=NON_NEGATIVE)
    momentum: float = _setting(0.9, "SGD / RMSProp momentum.", SCHEDULE)
    nesterov: bool = _setting(True, "Nesterov momentum for SGD.", SCHEDULE)
    adam_beta1: float = _setting(0.9, "Adam β1.", SCHEDULE)
    adam_beta2: float = _setting(0.999, "Adam β2.", SCHEDULE)
    epsilon: float = _setting(1e-7, "Adam / RMSProp ε.", SCHEDULE)
    rmsprop_decay: float = _setting(0.9, "RMSProp decay ρ.", SCHEDULE)
    weight_decay: float = _setting(
        5e-4, "L2 coefficient λ: adds λ/2·Σ‖W‖² over kernels (= PyTorch SGD weight_decay).",
        SCHEDULE, check=NON_NEGATIVE)
    seed: int = _setting(
        0, "Seed of initialisation, data order and augmentation.", SCHEDULE, check=NON_NEGATIVE)
    # Run and reliability.
    model_dir: str = _setting(
        "runs/default", "Output folder: flags.json, TensorBoard events, checkpoints (resumed "
        "automatically), results.json, export/.", RUN, resumable=True)
    overwrite: bool = _setting(
        False, "Replace a --model_dir that holds a run of another configuration (otherwise "
        "refused).", RUN, resumable=True)
    eval_every_epochs: int = _setting(
        1, "Evaluate on the test split every this many epochs (and at the end).", RUN,
        resumable=True, check=POSITIVE)
    export: bool = _setting(
        True, "Write SavedModels to model_dir/export/peer{k} and export/ensemble at the end.",
        RUN, resumable=True)
    checkpoint_every_steps: int = _setting(
        0, "Also checkpoint every N steps inside an epoch (0: at epoch ends only; "
        "SIGINT/SIGTERM always checkpoint the exact position).", RUN, resumable=True,
        check=NON_NEGATIVE)
    on_nan: str = _setting(
        "stop", "A NaN/Inf loss: stop (keeping the last checkpoint) or skip that peer's update, "
        "counted in TensorBoard as train/peer{k}/skipped_steps.", RUN, resumable=True,
        choices=choices.ON_NAN)
    on_collapse: str = _setting(
        "warn", "After an epoch in which every peer's mean predictive entropy is above 95% of "
        "log M and its cross-entropy near log M (a cohort collapsed to uniform predictions): "
        "warn (one line, and train/collapsed in TensorBoard) or stop (keeping the last "
        "checkpoint).", RUN, resumable=True, choices=collapse.ON_COLLAPSE)
    deterministic: bool = _setting(
        False, "TensorFlow op determinism: with the seeded data order and augmentation, a "
        "resumed run ends with the weights of an uninterrupted one (slower on GPUs).", RUN,
        resumable=True)
    distribution: str = _setting(
        "none", "none; mirrored: MirroredStrategy over the local devices, each replica holding "
        "the whole cohort, the global batch split; multi_worker: MultiWorkerMirroredStrategy "
        "from TF_CONFIG.", RUN, choices=choices.DISTRIBUTIONS)
    peer_placement: str = _setting(
        "replicated", "per_device: peer k on device k mod n, only probabilities cross devices "
        "(paper Sec. 4.5); implies --update=simultaneous.", RUN, choices=choices.PLACEMENTS)
    precision: str = _setting(
        "float32", "float32; mixed_bfloat16: layers in bfloat16, variables, logits, softmax and "
        "losses in float32 (CPUs with AVX-512 BF16/AMX, TPUs; other CPUs emulate bfloat16, many "
        "times slower, and a warning says so); mixed_float16: the same in "
        "float16 with dynamic loss scaling (GPUs).", RUN, choices=choices.PRECISIONS)
    jit_compile: bool = _setting(
        False, "Compile the cohort step with XLA. Off by default: on the CPU it measured slower "
        "(bench/RESULTS.md); try it on GPUs.", RUN, resumable=True)
    intra_op_threads: int = _setting(
        0, "Threads inside one op (0: TensorFlow's choice, one per core).", RUN, resumable=True,
        check=THREADS)
    inter_op_threads: int = _setting(
        0, "Ops run at once, e.g. the peers' forward passes (0: TensorFlow's choice).", RUN,
        resumable=True, check=THREADS)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def settings():
    """(name, Setting, default) of every Config field, in the table's order."""
    return [(f.name, f.metadata["setting"], f.default) for f in dataclasses.fields(Config)]


def help_groups():
    """--help's sections: (title, the names of the settings it lists), in GROUPS order."""
    return tuple((group, tuple(name for name, s, _ in settings() if s.group == group))
                 for group in GROUPS)


def resumable_settings():
    """The settings a resumed run may change (the others need --overwrite)."""
    return tuple(name for name, s, _ in settings() if s.resumable)


def script_settings(script):
    """The settings `script` defines as flags (the others keep the table's default)."""
    return tuple(name for name, s, _ in settings() if script in s.scripts())


_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string, tuple: flags.DEFINE_string}


def value_type(field):
    """int for `int | None`, and so on: the type of a Config field's values (None aside)."""
    (single,) = (t for t in typing.get_args(field.type) or (field.type,) if t is not type(None))
    return single


def flag_default(name):
    """The table's default of setting `name` as its flag holds it (a tuple as its text)."""
    default = Config.__dataclass_fields__[name].default
    return flag_text(default) if isinstance(default, tuple) else default


def define_flags(flag_values, script, defaults=None):
    """Defines the flags of `script`'s settings, their type from the Config field.

    Args:
      flag_values: the absl FlagValues to define them in.
      script: one of SCRIPTS; a dataset's own settings are flags of its scripts only.
      defaults: {name: value} overriding the table's defaults (the script's dataset setting,
        e.g. run_market.py's Adam), as the flag's text or value.
    """
    if script not in SCRIPTS:
        raise ValueError(f"script={script!r} is not one of {', '.join(SCRIPTS)}.")
    for field in dataclasses.fields(Config):
        setting = field.metadata["setting"]
        if script not in setting.scripts():
            continue
        text = setting.help[script] if isinstance(setting.help, dict) else setting.help
        if setting.choices:
            flags.DEFINE_enum(field.name, flag_default(field.name), list(setting.choices), text,
                              flag_values=flag_values)
        else:
            _DEFINE[value_type(field)](field.name, flag_default(field.name), text,
                                       flag_values=flag_values)
    for name, value in (defaults or {}).items():
        flag_values.set_default(name, value)


def validate(config):
    """Raises UserError naming the flag for values no run can use (no library module needed)."""
    for name, setting, _ in settings():
        value = getattr(config, name)
        if isinstance(value, float) and not math.isfinite(value):  # absl parses "nan", "inf"
            raise UserError(f"--{name} must be a finite number, got {value}.")
        if setting.check and value is not None and not setting.check.holds(value):
            raise UserError(f"--{name} must be {setting.check.words}, got {value}.")
    for key, _ in config.net_args:
        if key in RESERVED_NET_ARGS:
            raise UserError(f"--net_args sets '{key}', which the cohort sets for every peer "
                            f"itself; drop it from --net_args.")
    _validate_combinations(config)
    return config


def _validate_combinations(config):
    """Refuses settings that are each valid but do not go together."""
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
    if not config.train_steps and config.warmup_epochs >= config.epochs:
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

    A --train_steps the command line (or a flagfile) did not give yields to an explicit
    --epochs: run_market.py's default budget of 200k steps would otherwise silently replace it.

    Args:
      flag_values: parsed absl FlagValues with a run script's flags (`define_flags`).
      **fixed: fields a run script does not expose as flags (e.g. dataset="market1501").
    """
    values = dict(fixed)
    for name, setting, _ in settings():
        if name in flag_values:
            value = flag_values[name].value
            values[name] = setting.parse(value) if setting.parse and value is not None else value
    if "epochs" in flag_values and flag_values["epochs"].present:
        if flag_values["train_steps"].present and values["train_steps"]:
            raise UserError(f"--epochs={values['epochs']} and --train_steps="
                            f"{values['train_steps']} both give the run's length (on the command "
                            "line or in a --flagfile); drop one, or add --train_steps=0 to train "
                            "for --epochs.")
        if not flag_values["train_steps"].present:
            values["train_steps"] = None
    if values.get("train_steps") == 0:
        values["train_steps"] = None  # 0: no budget, as when unset
    return validate(Config(**values))
