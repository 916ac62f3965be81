"""Command-line parsing: an optional YAML/JSON args file, then flags that override it."""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import os
import re
import sys
import traceback
import typing
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from utils.errors import UsageError, one_line

ARGS_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def read_args_file(path: str) -> dict:
    """Read a YAML or JSON args file into a dict, with one-line errors for the usual mistakes."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"args file {path} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".json":
            values = json.loads(text) if text.strip() else {}
        else:
            values = yaml.safe_load(text) or {}
    except json.JSONDecodeError as e:
        raise UsageError(f"args file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"args file {path} is not valid YAML: {problem}{where}") from e
    if not isinstance(values, dict):
        raise UsageError(f"args file {path} must hold a mapping of flag names to values, not a {type(values).__name__}")
    return values


def _check_known_keys(parser: HfArgumentParser, values: dict, path: str) -> None:
    known = {action.dest for action in parser._actions}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"args file {path}: unknown key {key!r}{hint}")


def _check_value_shapes(parser: HfArgumentParser, values: dict, path: str) -> None:
    """A list or a mapping for a flag that takes one value is a mistake in the file: say which key."""
    # The annotations, not the fields' types: HfArgumentParser rewrites those (a union becomes str).
    types = {name: str(hint) for cls in parser.dataclass_types for name, hint in typing.get_type_hints(cls).items()}
    for key, value in values.items():
        kind = {list: "list", dict: "dict"}.get(type(value))
        if kind and key in types and kind not in types[key].lower():
            raise UsageError(f"args file {path}: {key} takes one value, not a {kind} ({value!r})")


# Where transformers and accelerate check argument values (TrainingArguments.__post_init__,
# the parser): a ValueError raised there is about the user's values, not a bug.
_ARGUMENT_CHECKS = ("/transformers/training_args.py", "/transformers/hf_argparser.py", "/accelerate/")


def _raised_by_argument_checks(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and any(part in frames[-1].filename.replace(os.sep, "/") for part in _ARGUMENT_CHECKS)


USAGE = "run_mlm.py [ARGS_FILE.yaml|.json] [--flag VALUE ...]"


def configure_help(parser: HfArgumentParser, description: str) -> None:
    """`--help` that starts with what the script does and how to call it, then the flags.

    argparse's usage line would list every flag (~400) in brackets before anything else; a
    short usage and the description come first instead. Each `--no_X` says it turns off
    --X rather than repeating its help, and a literal "%" in a help text (argparse formats
    help with %) is kept as typed.
    """
    parser.usage = USAGE
    parser.description = description
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            action.help = re.sub(r"%(?!\()", "%%", action.help)
        if action.option_strings and action.option_strings[0].startswith("--no_") and \
                isinstance(action, argparse._StoreFalseAction):
            action.help = f"Sets --{action.dest} false."


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (its examples keep their lines), each flag with its default."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreFalseAction):
            return action.help  # "(default: True)" after "Sets --X false." would confuse
        return super()._get_help_string(action)


def parse_args(parser: HfArgumentParser, argv: list[str] | None = None) -> tuple:
    """Parse `[ARGS_FILE] [--flag value ...]` into the parser's dataclasses.

    Values from the args file become the parser's defaults, so flags given after the
    file override them and `--help` shows them. The dataclasses' `__post_init__` checks
    run on the merged values: ours raise UsageError; a ValueError from transformers' own
    checks becomes one too. Any other exception is a bug and keeps its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(ARGS_FILE_SUFFIXES):
        path = argv.pop(0)
        values = read_args_file(path)
        _check_known_keys(parser, values, path)
        _check_value_shapes(parser, values, path)
        values, argv = merge_file_and_flags(values, argv)
        # A single value for a flag that takes several is taken as a list of one (__post_init__).
        parser.set_defaults(**values)
    else:
        argv = merge_file_and_flags({}, argv)[1]
    parser.error = _usage_error  # one line, not argparse's usage of every flag first
    try:
        *parsed, rest = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                           return_remaining_strings=True)
    except ValueError as e:
        if isinstance(e, UsageError) or not _raised_by_argument_checks(e):
            raise
        raise UsageError(one_line(e, limit=1000)) from e
    if rest:
        raise UsageError(_unknown_arguments(parser, rest))
    return tuple(parsed)


# Where the training text comes from: one source given as a flag replaces the args file's.
DATA_SOURCE_FLAGS = ("train_file", "dataset_name", "builtin_corpus", "tokenized_dataset_path")
DATA_SOURCE_KEYS = (*DATA_SOURCE_FLAGS, "validation_file", "dataset_config_name")
UNSET = ("none", "null")


def _flag_name(arg: str) -> str:
    return arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else ""


def merge_file_and_flags(values: dict, argv: list[str]) -> tuple[dict, list[str]]:
    """The args file's values and the flags, with what the flags take away from the file.

    - A data source on the command line (--train_file, --dataset_name, --builtin_corpus,
      --tokenized_dataset_path) replaces the file's: its train/validation files, dataset and
      built-in corpus are dropped (`configs/quickstart.yaml --train_file corpus.txt` works).
    - `--KEY none` (or null) unsets KEY, the file's value included, for this project's flags
      (transformers' own flags keep their meaning of "none", as in --report_to none).
    """
    from dataclasses import fields

    from transformers import TrainingArguments

    theirs = {f.name for f in fields(TrainingArguments)}
    values = dict(values)
    kept, i = [], 0
    while i < len(argv):
        name, inline = _flag_name(argv[i]), "=" in argv[i]
        value = argv[i].split("=", 1)[1] if inline else argv[i + 1] if i + 1 < len(argv) else None
        if name and name not in theirs and value is not None and value.strip().lower() in UNSET:
            values.pop(name, None)
            i += 1 if inline else 2
            continue
        kept.append(argv[i])
        i += 1
    flags = {_flag_name(arg) for arg in kept}  # a source given, not one unset
    if flags & set(DATA_SOURCE_FLAGS):
        for key in DATA_SOURCE_KEYS:
            if key not in flags:
                values.pop(key, None)
    return values, kept


def _usage_error(message: str):
    raise UsageError(f"{message} (--help lists the flags)")


def _unknown_arguments(parser: HfArgumentParser, rest: list[str]) -> str:
    """What the command line holds that no flag takes, with the closest flag for a typo, as args files get."""
    flags = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    unknown = [arg.split("=", 1)[0] for arg in rest if arg.startswith("-")] or rest[:1]
    close = difflib.get_close_matches(unknown[0], flags, n=1)
    hint = f" (did you mean {close[0]}?)" if close else " (--help lists the flags)"
    return f"unknown argument {unknown[0]}{hint}" + (f"; also {' '.join(unknown[1:])}" if len(unknown) > 1 else "")


def given_keys(argv: list[str] | None = None) -> set[str]:
    """The argument names set explicitly: keys of the args file and flags on the command line.

    Tells "--report_to none" (a choice) from not mentioning report_to (the default).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    values = read_args_file(argv.pop(0)) if argv and argv[0].endswith(ARGS_FILE_SUFFIXES) else {}
    values, argv = merge_file_and_flags(values, argv)
    keys = set(values)
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            keys.add(name[3:] if name.startswith("no_") else name)
    return keys


def move_hub_token_to_env(training_args) -> None:
    """Keep --hub_token out of files: the Trainer pickles its arguments into every checkpoint.

    huggingface_hub reads HF_TOKEN from the environment, so pushes still authenticate.
    """
    if training_args.hub_token:
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None


def leaves_environment_as_found(main):
    """Decorate a `main(argv=None, command_line=False)`: called in-process, it gives back os.environ as it was.

    A run sets variables for itself (HF_TOKEN from --hub_token, ACCELERATE_USE_CPU for a CPU
    process group); a notebook or a test that calls `main()` should not keep them. The
    script itself (`command_line=True`) ends with its process, so nothing is restored.
    """

    @functools.wraps(main)
    def wrapper(*args, command_line: bool = False, **kwargs):
        if command_line:
            return main(*args, command_line=True, **kwargs)
        saved = dict(os.environ)
        try:
            return main(*args, command_line=False, **kwargs)
        finally:
            for name in set(os.environ) - set(saved):
                del os.environ[name]
            os.environ.update(saved)

    return wrapper
