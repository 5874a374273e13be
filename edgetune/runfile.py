"""One file for a run's options: ``--config RUN_YAML`` and ``--print-config`` for an argparse CLI (the edge server's).

``--print-config`` prints every option's effective value as YAML (option names are the argparse ``dest``, i.e. the
flag with ``_`` for ``-``); ``--config FILE`` reads such a file back as the defaults that the flags given override, so
the printed file reproduces the run. Unknown keys and values of the wrong type are refused naming what is allowed.
Secrets (a token given on the command line) are neither printed nor read: a file names a token file instead.
Standard library + PyYAML (every edgetune side has both).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from edgetune.dataclass_cli import check_mapping, check_value
from edgetune.errors import ConfigError

#: Parser destinations that are not run options.
_NOT_OPTIONS = frozenset({"help", "version", "config", "print_config"})


def add_run_file_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--config RUN_YAML`` and ``--print-config`` to ``parser`` (``what``: e.g. "server")."""
    parser.add_argument(
        "--config",
        default="",
        metavar="RUN_YAML",
        help=f"the {what}'s options from a YAML file (what --print-config prints); flags given with it override it",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective options as YAML (every option) and exit"
    )


def option_actions(parser: argparse.ArgumentParser, secret: Collection[str] = ()) -> dict[str, argparse.Action]:
    """The parser's run options by ``dest`` (not help/version/--config/--print-config, not the ``secret`` ones)."""
    return {
        a.dest: a
        for a in parser._actions
        if a.option_strings
        and a.dest not in _NOT_OPTIONS
        and a.dest not in secret
        and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
    }


def _hint(action: argparse.Action) -> Any:
    """The type of an option's value in a run file (a switch: bool; a repeatable flag: a list of strings)."""
    if action.nargs == 0:
        return bool
    if isinstance(action, argparse._AppendAction):
        return list[str]
    return action.type if action.type in (int, float) else str


def _check(action: argparse.Action, v: Any) -> Any:
    """``v`` as the value of ``action`` (ValueError saying what it takes)."""
    if v is None and action.default is None and action.nargs != 0:
        return None
    v = check_value(_hint(action), v)
    if action.choices is not None and v not in action.choices:
        raise ValueError(f"one of {list(action.choices)}")
    return v


def load_run_file(parser: argparse.ArgumentParser, path: str | Path, secret: Collection[str] = ()) -> dict[str, Any]:
    """The options a ``--config`` file sets, by ``dest`` (ConfigError: unreadable, not YAML, not a mapping, an unknown
    key with the allowed ones, a value of the wrong type with what the option takes)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the run config {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"run config {p} is not valid YAML: {e}") from None

    def secret_hint(unknown: list[str]) -> str:
        named = sorted(set(unknown) & set(secret))
        return f" ({', '.join(named)}: give it in a file, e.g. --token-file)" if named else ""

    checks = {dest: functools.partial(_check, a) for dest, a in option_actions(parser, secret).items()}
    try:
        return check_mapping(data, checks, f"run config {p}", secret_hint)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_args_with_run_file(
    parser: argparse.ArgumentParser, argv: list[str] | None = None, secret: Collection[str] = ()
) -> argparse.Namespace:
    """``parser.parse_args(argv)`` where a ``--config FILE`` gives the defaults (a required option the file sets is
    no longer required on the command line). ConfigError where the file is bad."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = load_run_file(parser, known.config, secret)
        actions = option_actions(parser, secret)
        for dest in values:
            actions[dest].required = False
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def run_file_yaml(parser: argparse.ArgumentParser, args: argparse.Namespace, secret: Collection[str] = ()) -> str:
    """Every run option's effective value as YAML: what ``--print-config`` prints and ``--config`` reads back."""
    return str(yaml.safe_dump({dest: getattr(args, dest) for dest in option_actions(parser, secret)}, sort_keys=False))
