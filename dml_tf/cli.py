"""The run scripts' entry point: flags checked in a second, TensorFlow started only for a run.

`main(flag_values, define_flags, make_config)` parses the command line into the run script's
flag values with absl (flagfiles read by dml_tf.flagfiles), builds and checks the Config and
the model_dir's state without TensorFlow, and only then imports TensorFlow (quietly,
`dml_tf.quiet_start`) and trains. A mistake a user can make is one line,
``error: <sentence>`` on stderr, and exit status 2.
`--print_config` shows the resolved settings and where each came from, and exits.
"""

import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from dml_tf import config as config_lib
from dml_tf import flagfiles, quiet_start, run_dir
from dml_tf.errors import UserError

# The arguments that ask for the run script's manual (absl's --help and --helpshort, and -h).
HELP_ARGS = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
# The run scripts' flags that are no setting of a run (not in Config): what the command does.
COMMAND_FLAG_NAMES = ("print_config",)
# --help's sections: a title and the flags it holds (the settings table's groups, the command's
# own flags with the run's); a flag in none of them is listed under "other".
HELP_GROUPS = tuple((title, names + COMMAND_FLAG_NAMES if title == config_lib.RUN else names)
                    for title, names in config_lib.help_groups())


def main(flag_values, define_flags, make_config, argv=None):
    """Runs a run script: `flag_values` (its absl FlagValues), `define_flags(flag_values)` and
    `make_config(flag_values)` are its own; this module reads no global flags.

    Exits 0 after --help (the script's flags, grouped), --print_config and a finished run, 2 on
    a UserError, 128 + the signal number when SIGINT/SIGTERM stopped training.
    """
    define_flags(flag_values)
    define_command_flags(flag_values)
    sources = {}  # flag name -> where its value came from, filled in by the parser
    app.run(lambda args: run(flag_values, make_config, args, sources), argv=argv,
            flags_parser=flags_parser(flag_values, main_doc=sys.modules["__main__"].__doc__,
                                      sources=sources))


def define_command_flags(flag_values):
    """Defines the flags named in COMMAND_FLAG_NAMES on `flag_values`."""
    flags.DEFINE_bool("print_config", False, "Print every setting with its resolved value and "
                      "where it came from (default, the script's default, a flagfile, the "
                      "command line), then exit without starting TensorFlow or touching "
                      "--model_dir: a flagfile's preview before a long run.",
                      flag_values=flag_values)


def flags_parser(flag_values, main_doc=None, sources=None):
    """An absl `flags_parser` for app.run: a bad flag value or flagfile is one sentence and exit
    status 2 (absl's default prints the usage and exits 1); --help prints `manual` and exits 0.

    Args:
      flag_values: the FlagValues to parse into.
      main_doc: the run script's docstring, --help's head.
      sources: a dict that receives {flag name: where its value came from}.
    """

    def parse(argv):
        try:
            expanded = flagfiles.expand(argv)  # --flagfile=... inlined
            args = [arg for arg, _ in expanded]
            if asks_for_help(args):
                print(manual(flag_values, main_doc))
                sys.exit(0)
            remaining = flag_values(args)
        except (UserError, flags.Error) as e:
            _exit_with_error(e)
        if sources is not None:
            sources.update(flagfiles.sources(expanded, flag_values))
        return remaining

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
    tail = ("--flagfile=FILE reads flags from a file (a --flagfile= inside it is also looked for "
            "from that file's folder and the folders above it); --helpfull lists every flag, "
            "absl's included.")
    return "\n\n".join(part for part in (head, *sections, tail) if part)


def _own_flags(flag_values):
    """The flags the run script and dml_tf.config define: all but absl's own."""
    return sorted(flag.name for module, defined in flag_values.flags_by_module_dict().items()
                  if not module.startswith("absl.") for flag in defined)


def run(flag_values, make_config, argv, sources=None):
    """The `main(argv)` absl calls once `flag_values` is parsed: check everything, then train (or,
    with --print_config, print the settings)."""
    if len(argv) > 1:
        _exit_with_error(f"unexpected arguments {' '.join(argv[1:])}: every setting is a "
                         "--flag (see --help).")
    try:
        config = make_config(flag_values)
        if "print_config" in flag_values and flag_values.print_config:
            print(describe(config, flag_values, sources or {}, os.path.basename(argv[0])))
            sys.exit(0)
        # The model_dir's state (a file, locked, another run's, ...) and kd's teacher run.
        run_dir.check(config)
        # Only now TensorFlow, for the checks that need the method's and networks' modules.
        quiet_start.quiet()
        config_lib.check_against_library(config)
        from dml_tf import train_lib  # noqa: PLC0415 (TensorFlow: only once the flags are good)
    except UserError as e:
        _exit_with_error(e)
    _train(train_lib, config)


def describe(config, flag_values, sources, script):
    """--print_config's text: every setting, by --help group, with its value and its origin.

    Args:
      config: the resolved Config.
      flag_values: the parsed flags it was made from.
      sources: {flag name: flagfiles.COMMAND_LINE or a flagfile's path} of the flags given.
      script: the run script's file name.
    """
    lines = [f"{script} resolves its flags to these settings (nothing was trained or written):"]
    for title, names in config_lib.help_groups():
        lines.append(f"\n{title}:")
        for name in names:
            value = getattr(config, name)
            shown = f"  --{name}" + (" (unset)" if value is None else
                                     f"={config_lib.flag_text(value)}")
            lines.append(f"{shown:<40} {_origin(name, value, flag_values, sources, script)}")
    return "\n".join(lines)


def _origin(name, value, flag_values, sources, script):
    """Where setting `name`'s value came from, as --print_config words it."""
    if name not in flag_values:
        if value != config_lib.Config.__dataclass_fields__[name].default:
            return f"set by {script}"
        return f"default (not a flag of {script})"
    flag = flag_values[name]
    if name in sources:
        origin = sources[name] if sources[name] == flagfiles.COMMAND_LINE else \
            f"flagfile {sources[name]}"
    elif flag.default != config_lib.flag_default(name):
        origin = f"{script} default"
    else:
        origin = "default"
    if value is None and flag.value:  # --train_steps that yielded to an explicit --epochs
        origin += f" {flag.value}, yielding to --epochs"
    return origin


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
