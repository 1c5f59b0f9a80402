"""Flagfiles as the run scripts read them, and where each flag's value came from.

The format is absl's (`FlagValues.read_flags_from_files`): one flag per line, lines starting
with # or // are comments, and a `--flagfile=` line includes another file in its place; later
flags win. absl opens a nested flagfile from the working directory only, so the paper's
flagfiles (which include flags/cifar_paper.flags) failed outside the repository root, and it
reports a missing file as "ERROR:: Unable to open flagfile". Here a nested path that does not
exist from the working directory is looked for from the including file's folder and the
folders above it, nearest first; a file that cannot be read is one sentence; and every flag
keeps its source, for --print_config.
"""

import os

from dml_tf.errors import UserError

COMMAND_LINE = "command line"
_DIRECTIVES = ("--flagfile", "-flagfile")


def expand(argv):
    """argv with every --flagfile replaced by the flags it holds, each with its source.

    Args:
      argv: the command line, program name first.

    Returns:
      [(argument, source)]: source is COMMAND_LINE or the path of the flagfile it was read from.

    Raises:
      UserError: a flagfile that does not exist, cannot be read or includes itself.
    """
    expanded = [(arg, COMMAND_LINE) for arg in argv[:1]]
    rest = list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg == "--":  # absl stops reading flags here too
            expanded.extend((a, COMMAND_LINE) for a in [arg, *rest])
            break
        if arg in _DIRECTIVES:  # "--flagfile FILE"
            if not rest:
                raise UserError("--flagfile names no file; give --flagfile=FILE.")
            name = rest.pop(0)
        elif arg.startswith(tuple(d + "=" for d in _DIRECTIVES)):
            name = arg.split("=", 1)[1]
        else:
            expanded.append((arg, COMMAND_LINE))
            continue
        expanded.extend(_read(_locate(name, including=None), stack=()))
    return expanded


def sources(expanded, flag_values):
    """{flag name: source} of the flags `expanded` (from `expand`) sets, the last one winning."""
    found = {}
    for arg, source in expanded[1:]:
        if arg == "--":
            break
        if not arg.startswith("-"):
            continue  # the value of a "--name value" pair, or a stray argument
        name = arg.lstrip("-").split("=", 1)[0]
        if name not in flag_values and name.startswith("no") and name[2:] in flag_values:
            name = name[2:]  # --noflag
        found[name] = source
    return found


def _read(path, stack):
    """The flags of flagfile `path` with their sources, nested flagfiles inlined."""
    stack = (*stack, os.path.realpath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "not a text file"
        raise UserError(f"--flagfile={path} cannot be read ({reason}); pass a text file of "
                        "flags, one per line.") from None
    flags = []
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith(("#", "//")):
            continue
        if not line.startswith(tuple(d + "=" for d in _DIRECTIVES)):
            flags.append((line, path))
            continue
        nested = _locate(line.split("=", 1)[1], including=path)
        if os.path.realpath(nested) in stack:
            raise UserError(f"{path} includes --flagfile={nested}, which is already being "
                            "read (a flagfile that includes itself); remove that --flagfile line.")
        flags.extend(_read(nested, stack))
    return flags


def _locate(name, including):
    """The path of flagfile `name`: as written from the working directory, else (when named
    in the flagfile `including`) from that file's folder or the nearest folder above it."""
    name = os.path.expanduser(name.strip())
    if not name:
        raise UserError(f"--flagfile names no file{f' in {including}' if including else ''}; "
                        "give --flagfile=FILE.")
    if os.path.exists(name):
        return _file(name)
    if including is None:
        raise UserError(f"--flagfile={name} does not exist in the working directory "
                        f"{os.getcwd()}; give the file's path from there, or run from the "
                        "repository root for the flags/ paths of the README.")
    folder = os.path.dirname(os.path.abspath(including))
    while True:
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return _file(_shown(candidate))
        if os.path.dirname(folder) == folder:
            break
        folder = os.path.dirname(folder)
    raise UserError(f"--flagfile={name}, named in {including}, exists neither from the working "
                    f"directory nor from that file's folder or any folder above it; correct "
                    f"the path in {including}.")


def _file(path):
    if os.path.isdir(path):
        raise UserError(f"--flagfile={path} is a folder; pass a file of flags.")
    return path


def _shown(path):
    """A found path as a user reads it: relative to the working directory when below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
