"""How ``onestep`` reports an error: one line, exit status 2.

Every exception that escapes a subcommand reaches the user as a single line on stderr::

    onestep: error: <what is wrong, naming the option or file, and the fix>

and the process exits with status 2 (a usage error: nothing was trained, or training stopped on a fault
whose message says how to resume). ``--debug`` anywhere on the command line (removed before parsing) or
``ONESTEP_DEBUG=1`` lets the exception through, so Python prints the whole traceback.

The project's own errors are ``ValueError`` / ``FileNotFoundError`` / ... whose message is written for the
user; anything else (a bug, an error from a library) keeps its type name in the line and points at
``--debug``. jsonargparse reports a bad option as a nested report ("Parser key "model": Does not validate
against any of the Union subtypes ... Given value: Namespace(...)"); :func:`summarize` keeps the innermost
reasons and drops the subtype list and the dump of the value.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

EXIT_USAGE = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "ONESTEP_DEBUG"
#: exceptions whose message is the whole story (our checks raise these with the option and the fix;
#: argparse/jsonargparse report a bad option, Lightning's MisconfigurationException a bad trainer option)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, TypeError, KeyError,
                                                argparse.ArgumentError)
USER_ERROR_NAMES = ("MisconfigurationException",)
#: the fix for messages that do not say it themselves
_HINTS = ((re.compile(r"^unrecognized arguments"), "`onestep fit --help` lists the options"),
          (re.compile(r"^Key \"[^\"]+\" is required"), "set it in the --config file or on the command line"),
          (re.compile(r"does not accept option"), "`onestep fit --help` lists the options"))

# lines of a jsonargparse report that say nothing a user can act on
_NOISE = re.compile(r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value type:"
                    r"|Expected a <class 'NoneType'>)")
_WEAK = re.compile(r"^Expected a path but")  # jsonargparse's guess, shown only when nothing better was said
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':\s*$")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_GIVEN_CLASS = re.compile(r"class_path='([^']+)'")
_WRONG_NUMBER = re.compile(r"^Expected a <class '(float|int)'>(?:\. Got value: (.*))?$")
_WRONG_CHOICE = re.compile(r"^Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$")
_GLUED_YAML = re.compile(r"[{,]\s*[A-Za-z_]\w*:[^\s/]")  # `{name:mlp}`: YAML reads one key "name:mlp"
_NON_FINITE = ("nan", ".nan", "inf", "+inf", "-inf", ".inf", "-.inf", "infinity", "-infinity")
_TYPE_WORDS = {"float": "a finite number", "int": "an integer"}


def take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether the traceback was asked for (flag or ``ONESTEP_DEBUG=1``)."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return [a for a in argv if a != DEBUG_FLAG], debug


def summarize(message: str) -> str:
    """One line from a (possibly nested, multi-line) error message.

    A jsonargparse report keeps the parser keys as a dotted option path and the innermost reasons:
    ``Parser key "model": ... Problem with given class_path 'X': Parser key "lr": Expected ...`` becomes
    ``--model.init_args.lr: ...``; an error raised inside a constructor keeps its own message, prefixed by
    the class. Non-finite numbers and YAML written ``{key:value}`` get a sentence that says the fix."""
    lines = [line.strip().removeprefix("- ") for line in str(message).splitlines() if line.strip()]
    if not any(_PARSER_KEY.match(line) or line.startswith("Does not validate") for line in lines):
        return " ".join(lines)
    keys: list[str] = []
    reasons: list[str] = []
    class_path = given = None
    for line in lines:
        if line.startswith("Given value:"):
            given = given or line.removeprefix("Given value:").strip()  # the first one is the innermost
            class_path = class_path or (_GIVEN_CLASS.search(line).group(1) if _GIVEN_CLASS.search(line) else None)
        elif _PARSER_KEY.match(line):
            key, reason = _PARSER_KEY.match(line).groups()
            keys.append(key)
            reasons += [reason] if reason else []
        elif _CLASS_PATH.match(line):
            class_path = _CLASS_PATH.match(line).group(1)
            keys.append("init_args")
        elif not _NOISE.match(line):
            reasons.append(line)
    strong = [r for r in reasons if not _WEAK.match(r)]
    reason = _explain(list(dict.fromkeys(strong or reasons)), "--" + ".".join(keys), class_path, given)
    if keys and keys[-1] == "init_args" and not any(_NOT_ACCEPTED.match(r) for r in strong):
        # the class itself is the problem (not importable, not a subclass)
        return (f"--{'.'.join(keys[:-1])}.class_path={class_path}: {reason}; give module.Class of an importable "
                "generator class (see docs/contracts.md)")
    option = "--" + ".".join(keys) if keys and keys[-1] != "init_args" else ""
    if option:
        return f"{option}: {reason}"
    prefix = f"{class_path.rsplit('.', 1)[-1]}: " if class_path else ""
    return reason if reason.startswith(prefix) else prefix + reason


def _explain(reasons: list[str], option: str, class_path: str | None, given: str | None) -> str:
    """The reasons, with jsonargparse's type wording turned into what to write instead."""
    name = option.rsplit(".", 1)[-1]
    out = []
    for reason in reasons:
        wrong = _WRONG_NUMBER.match(reason)
        if wrong:
            kind, value = wrong.groups()
            value = value if value is not None else given
            reason = f"got {value}; use {_TYPE_WORDS[kind]}"
            if value.strip().lower() in _NON_FINITE:
                reason = f"got {value}; nan and inf are not allowed, use a finite number"
            stated = _stated_range(class_path, name) if class_path and name else None
            reason += f" ({name} must {stated})" if stated else ""
        elif _WRONG_CHOICE.match(reason):
            choices, value = _WRONG_CHOICE.match(reason).groups()
            listed = ", ".join(c.strip().strip(chr(39)) for c in choices.split(","))
            reason = f"{name} must be one of {listed}, got {value!r}" if name else f"got {value!r}; use one of {listed}"
        elif _NOT_ACCEPTED.match(reason) and class_path:
            cls = class_path.rsplit(".", 1)[-1]
            reason = (f"{_NOT_ACCEPTED.match(reason).group(1)!r} is not an option of {cls}; "
                      f"`onestep fit --model.help {cls}` lists its options")
        elif "Mapping" in reason and given and _GLUED_YAML.search(given):
            fixed = re.sub(r",(?=\S)", ", ", re.sub(r"([{,]\s*[A-Za-z_]\w*):(?=\S)", r"\1: ", given))
            reason = f"{given!r} is not a mapping: YAML needs `key: value` with a space after the colon; write {fixed}"
        out.append(reason)
    return "; ".join(out) or "invalid value" + (f" {given}" if given else "")


def _stated_range(class_path: str, option: str) -> str | None:
    """The rule the generator class declares for ``option`` on its signature (see onestep.options)."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        from onestep.options import declared_rule
    except Exception:  # noqa: BLE001 - an unknown class only loses the range in the message
        return None
    return declared_rule(cls, option)


def one_line(err: BaseException) -> str:
    """The error as the one line the user sees (without the ``onestep: error:`` prefix)."""
    text = summarize(str(err)) or type(err).__name__
    text += "".join(f"; {hint}" for pattern, hint in _HINTS if pattern.search(text))
    if isinstance(err, USER_ERRORS) or type(err).__module__.startswith("onestep") or \
            type(err).__name__ in USER_ERROR_NAMES:
        return text
    return f"{type(err).__name__}: {text} (rerun with {DEBUG_FLAG} for the traceback)"


def report_errors(run: Callable[[], int], debug: bool, prog: str = "onestep") -> int:
    """``run()``, with any exception turned into one line on stderr and exit status 2 (unless ``debug``).

    ``SystemExit`` (``--help``, an argparse usage error, Lightning's own exit) and ``KeyboardInterrupt``
    pass through unchanged."""
    try:
        return run()
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - this is the one place errors become messages
        if debug:
            raise
        sys.stdout.flush()
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_USAGE


def check_writable_dir(option: str, path: str | os.PathLike) -> None:
    """Refuse an output folder that cannot be written (a file in its place or above it, no permission)
    before anything runs; nothing is created here (the folder is made when the first file is written)."""
    target = Path(path).expanduser()
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        where = "is a file" if existing == target else f"lies under the file {existing}"
        raise ValueError(f"{option}={path}: {where}, not a folder; give {option} a folder path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(f"{option}={path}: cannot write in {existing} ({err.strerror or err}); give {option} a "
                         "folder you can write to") from None


def check_config_files(argv: list[str]) -> None:
    """Read every ``--config``/``-c`` file of ``argv`` as YAML first: jsonargparse reports a syntax error
    without the file's name ("in <unicode string>, line 4"), and a missing file without the fix."""
    import yaml

    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        file = Path(path).expanduser()
        if not file.is_file():
            where = "is a folder" if file.is_dir() else "does not exist"
            raise FileNotFoundError(f"--config {path}: the file {where}; give a YAML file such as "
                                    "configs/<method>/vector.yaml, or a method folder (configs/<method>) with "
                                    "--data.dataset")
        try:
            yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"--config {path}: {describe_yaml_error(err)}") from None
        except UnicodeDecodeError:
            raise ValueError(f"--config {path}: not a text file; give a YAML file") from None


def describe_yaml_error(err: Exception) -> str:
    """A YAML syntax error on one line: where, what, and the usual fixes."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return (f"{where}not valid YAML ({problem}); fix the syntax there (`key: value` with a space after the colon, "
            "spaces not tabs for indentation, closed brackets)")
