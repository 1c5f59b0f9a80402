"""The run scripts' entry point: flags checked in a second, TensorFlow started only for a run.

`main(define_flags, make_config)` parses the command line with absl, builds and checks the
Config and the model_dir's state without TensorFlow, and only then imports TensorFlow
(quietly, `dml_tf.quiet_start`) and trains. A mistake a user can make is one line,
``error: <sentence>`` on stderr, and exit status 2.
"""

import sys

from absl import app, flags
from absl import logging as absl_logging

from dml_tf import config as config_lib
from dml_tf import quiet_start, run_dir
from dml_tf.errors import UserError

# The arguments that ask for the run script's manual (absl's --help and --helpshort, and -h).
HELP_ARGS = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
# --help's sections: a title and the flags it holds (the settings table's groups); a flag in
# none of them is listed under "other".
HELP_GROUPS = config_lib.help_groups()


def main(define_flags, make_config, argv=None):
    """Runs a run script: `define_flags(flag_values)` and `make_config(flag_values)` are its own.

    Exits 0 after --help (the script's flags, grouped) and after a finished run, 2 on a
    UserError, 128 + the signal number when SIGINT/SIGTERM stopped training.
    """
    define_flags(flags.FLAGS)
    app.run(lambda args: run(make_config, args), argv=argv,
            flags_parser=flags_parser(flags.FLAGS, main_doc=sys.modules["__main__"].__doc__))


def flags_parser(flag_values, main_doc=None):
    """An absl `flags_parser` for app.run: a bad flag value is one sentence and exit status 2
    (absl's default prints the usage and exits 1); --help prints `manual` and exits 0."""

    def parse(argv):
        try:
            expanded = flag_values.read_flags_from_files(argv)  # --flagfile=... inlined
            if asks_for_help(expanded):
                print(manual(flag_values, main_doc))
                sys.exit(0)
            return flag_values(expanded)
        except flags.Error as e:
            _exit_with_error(e)

    return parse


def asks_for_help(argv):
    """Whether a help argument comes before the end of the flags ("--")."""
    flags_part = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    return any(arg in HELP_ARGS for arg in flags_part)


def manual(flag_values, main_doc=None):
    """The run script's help: its docstring, then its flags in `HELP_GROUPS`, with defaults."""
    listed = {name for _, names in HELP_GROUPS for name in names}
    others = tuple(name for name in _own_flags(flag_values) if name not in listed)
    groups = [*HELP_GROUPS, ("other", others)]
    # absl renders the key flags of a "module"; each section is registered as one.
    sections = []
    for title, names in groups:
        for name in names:
            if name in flag_values:
                flag_values.register_key_flag_for_module(title, flag_values[name])
        text = flag_values.module_help(title).strip("\n")
        if text:
            sections.append(text)
    head = (main_doc or "").strip()
    tail = "--flagfile=FILE reads flags from a file; --helpfull lists every flag, absl's included."
    return "\n\n".join(part for part in (head, *sections, tail) if part)


def _own_flags(flag_values):
    """The flags the run script and dml_tf.config define: all but absl's own."""
    return sorted(flag.name for module, defined in flag_values.flags_by_module_dict().items()
                  if not module.startswith("absl.") for flag in defined)


def run(make_config, argv):
    """The `main(argv)` absl calls with the parsed flags: check everything, then train."""
    if len(argv) > 1:
        _exit_with_error(f"unexpected arguments {' '.join(argv[1:])}: every setting is a "
                         "--flag (see --help).")
    try:
        config = make_config(flags.FLAGS)
        run_dir.check(config)  # the model_dir's state: a file, locked, another run's, ...
        # Only now TensorFlow, for the checks that need the method's and networks' modules.
        quiet_start.quiet()
        config_lib.check_against_library(config)
        from dml_tf import train_lib  # noqa: PLC0415 (TensorFlow: only once the flags are good)
    except UserError as e:
        _exit_with_error(e)
    _train(train_lib, config)


def _train(train_lib, config):
    # TensorFlow's INFO lines (checkpoint sharding, SavedModel assets) would bury the progress.
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        train_lib.train_and_evaluate(config)
    except UserError as e:
        _exit_with_error(e)
    except train_lib.Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(128 + e.signum)


def _exit_with_error(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
