"""The settings table: every Config field is one setting, from which the run scripts' flags,
--help's sections, the settings a resume may change and the range checks all derive."""

import dataclasses

import pytest
from absl import flags

import run_cifar
import run_imagenet
import run_market
from dml_tf import choices, cli, config, methods, run_dir
from dml_tf.errors import UserError

SCRIPTS = {"run_cifar.py": run_cifar, "run_market.py": run_market, "run_imagenet.py": run_imagenet}
FIELDS = {f.name for f in dataclasses.fields(config.Config)}
# The dataset's own settings a script has no flag for (its datasets do not use them).
NOT_FLAGS = {
    "run_cifar.py": {"image_size", "labelled_ids", "multiquery_pooling", "init", "init_checkpoint",
                     "label_offset"},
    "run_market.py": {"dataset", "tfds_data_dir", "labelled_fraction", "label_offset"},
    "run_imagenet.py": {"dataset", "labelled_fraction", "labelled_ids", "multiquery_pooling",
                        "init_checkpoint"},
}
# The settings a resumed run may change, as run_dir listed them before the table existed.
RESUMABLE = {"epochs", "eval_every_epochs", "export", "steps_per_epoch", "eval_batch_size",
             "data_dir", "tfds_data_dir", "model_dir", "jit_compile", "train_steps",
             "intra_op_threads", "inter_op_threads", "overwrite", "deterministic", "on_nan",
             "on_collapse", "checkpoint_every_steps", "teacher_checkpoint"}
# Every range check: (setting, a value out of range, a value in range, the words of the refusal).
RANGES = [
    ("epochs", 0, 1, "positive"), ("batch_size", 0, 1, "positive"),
    ("eval_batch_size", -1, 1, "positive"), ("learning_rate", 0.0, 1e-9, "positive"),
    ("eval_every_epochs", 0, 1, "positive"), ("steps_per_epoch", 0, 1, "positive"),
    ("teacher_peer", 0, 1, "positive"), ("train_steps", -1, 0, "0 or positive"),
    ("seed", -1, 0, "0 or positive"), ("weight_decay", -1e-9, 0.0, "0 or positive"),
    ("checkpoint_every_steps", -1, 0, "0 or positive"), ("labelled_ids", -1, 0, "0 or positive"),
    ("warmup_epochs", -0.5, 0.0, "0 or positive"), ("label_offset", -1, 0, "0 or positive"),
    ("intra_op_threads", -1, 0, r"0 \(TensorFlow's choice\) or positive"),
    ("inter_op_threads", -1, 0, r"0 \(TensorFlow's choice\) or positive"),
    ("labelled_fraction", 0.0, 1.0, r"in \(0, 1\]"),
    ("labelled_fraction", 1.01, 0.01, r"in \(0, 1\]"),
    ("val_fraction", 1.0, 0.99, r"in \(0, 1\)"), ("val_fraction", 0.0, 0.01, r"in \(0, 1\)"),
]


def _own_flags(script):
    flag_values = flags.FlagValues()
    SCRIPTS[script].define_flags(flag_values)
    return flag_values, {name for module, defined in flag_values.flags_by_module_dict().items()
                         if not module.startswith("absl.") for name in (f.name for f in defined)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_config_field_is_a_flag_of_the_scripts_that_take_it_and_every_flag_a_field(script):
    _, defined = _own_flags(script)
    assert defined - FIELDS == set(), "flags without a Config field"
    assert FIELDS - defined == NOT_FLAGS[script], "Config fields without the script's flag"


def test_every_field_is_a_flag_of_some_script_and_in_one_help_section():
    assert set.intersection(*NOT_FLAGS.values()) == set()
    sections = [names for _, names in cli.HELP_GROUPS]
    for name in FIELDS:
        assert sum(name in names for names in sections) == 1, name
    assert [title for title, _ in cli.HELP_GROUPS] == [
        "data", "cohort and method", "schedule", "run and reliability"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_in_a_section_and_none_under_other(script):
    flag_values, defined = _own_flags(script)
    cli.define_command_flags(flag_values)
    text = cli.manual(flag_values)
    assert "\nother:" not in text
    for name in defined | set(cli.COMMAND_FLAG_NAMES):
        assert f"  --{name}:" in text or f"  --[no]{name}:" in text, name


def test_the_settings_a_resume_may_change_are_unchanged():
    assert set(run_dir.RESUMABLE_CHANGES) == RESUMABLE
    assert run_dir.changed_settings({"epochs": 1, "seed": 1, "nets": ["a"]},
                                    {"epochs": 2, "seed": 2, "nets": ["a"]}) == ["seed"]


@pytest.mark.parametrize("name, bad, good, words", RANGES)
def test_each_range_check_refuses_naming_the_flag(name, bad, good, words):
    base = config.Config(epochs=10)
    assert config.validate(dataclasses.replace(base, **{name: good}))
    with pytest.raises(UserError, match=rf"^--{name} must be {words}, got {bad}\.$"):
        config.validate(dataclasses.replace(base, **{name: bad}))


def test_every_setting_with_a_range_check_is_tested():
    checked = {name for name, setting, _ in config.settings() if setting.check}
    assert checked == {name for name, *_ in RANGES}


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_flag_parses_to_its_fields_type(script):
    flag_values, _ = _own_flags(script)
    flag_values([script])
    cfg = SCRIPTS[script].make_config(flag_values)
    for field in dataclasses.fields(config.Config):
        value = getattr(cfg, field.name)
        assert value is None or isinstance(value, config.value_type(field)), field.name


def test_script_defaults_override_the_table():
    for script, module in SCRIPTS.items():
        for name in getattr(module, "DEFAULTS", {}):
            assert name in config.script_settings(script), (script, name)
    flag_values, _ = _own_flags("run_market.py")
    flag_values(["run_market.py"])
    cfg = run_market.make_config(flag_values)
    assert (cfg.optimizer, cfg.learning_rate, cfg.image_size) == ("adam", 2e-4, (224, 224))
    assert config.Config().optimizer == "sgd"


def test_the_choice_tuples_are_the_implementations():
    from dml_tf import reid_task  # noqa: PLC0415 (TensorFlow)

    needs_teacher = {name for name in methods.NAMES
                     if getattr(methods.method_class(name), "needs_teacher", False)}
    assert set(choices.TEACHER_METHODS) == needs_teacher
    assert tuple(choices.MULTIQUERY_POOLINGS) == tuple(reid_task.POOLINGS)
