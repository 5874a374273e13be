"""Command lines derived from a dataclass config: one flag per field, with the field's type, default and help.

A field carries its help in ``metadata["help"]`` (:func:`opt`). The flag is ``--field-name``; its type comes from the
annotation: ``int``/``float``/``str``; ``int``/``float``/``str``/``Path`` ``| None`` (an empty ``Path`` is None);
``bool`` (default False: ``--name`` sets it, default True: ``--no-name`` clears it); ``tuple[str, ...]`` (a comma
list); ``dict[str, float]`` / ``dict[str, str]`` (``NAME=VALUE[,NAME=VALUE]``). A field with no default is a
required flag. Where that does not fit (another flag name, a repeatable flag, choices), a :class:`Flag` says so.
Standard library only (the edge packages may use it too).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgetune import __version__


def add_version(p: argparse.ArgumentParser) -> None:
    """Every CLI's ``--version``: its name and the edgetune version."""
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every CLI's ``--help``: the description as written, and each option's default appended as ``(default: X)``
    unless its help already states one or there is nothing to state (no value, a switch that is off, an empty list).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        empty = isinstance(d, (str, tuple, list, dict)) and not d
        if (
            not action.option_strings
            or action.nargs == 0
            or "default" in text.lower()
            or d is None
            or d is argparse.SUPPRESS
            or empty
        ):
            return text
        shown = ",".join(map(str, d)) if isinstance(d, (tuple, list)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,  # noqa: A002 - argparse's name for it
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with its help text: ``x: int = opt(3, "what x is")``; ``factory`` for mutable defaults."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one field differs from its generated flag; unset attributes keep the generated ones."""

    flag: str = ""  #: flag name (default ``--field-name``; ``--no-field-name`` for a bool that defaults to True)
    help: str | None = None  #: help text (default the field's)
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    repeat: bool = False  #: a ``tuple[str, ...]`` filled by repeating the flag instead of a comma list


def comma_list(text: str) -> tuple[str, ...]:
    """``a,b,,c`` -> ("a", "b", "c")."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def key_values(value_type: type, word: str) -> Callable[[str], dict[str, Any]]:
    """A parser of ``NAME=<word>[,NAME=<word>]`` into a dict with ``value_type`` values."""

    def parse(text: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in filter(None, text.split(",")):
            k, sep, v = part.partition("=")
            try:
                out[k.strip()] = value_type(v)
            except ValueError:
                sep = ""
            if not sep or not k.strip():
                raise argparse.ArgumentTypeError(f"expected NAME={word}[,NAME={word}], got {text!r}")
        return out

    return parse


def optional_path(text: str) -> Path | None:
    """``""`` -> None (``Path("")`` would be the working directory), else the path."""
    return Path(text) if text else None


def _optional(hint: Any) -> Any:
    """``X`` of an ``X | None`` (``Optional[X]``) hint with one X, else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def flag_name(f: dataclasses.Field[Any], over: Flag | None = None) -> str:
    """The command-line flag of field ``f``."""
    if over is not None and over.flag:
        return over.flag
    stem = f.name.replace("_", "-")
    return f"--no-{stem}" if f.default is True else f"--{stem}"


def add_fields(parser: argparse.ArgumentParser, cls: type, overrides: Mapping[str, Flag] | None = None) -> None:
    """One argument per init field of dataclass ``cls`` (``dest`` = the field name); ``overrides`` by field name."""
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    unknown = set(overrides) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"overrides for fields {cls.__name__} does not have: {sorted(unknown)}")
    for f in fields:
        over = overrides.get(f.name, Flag())
        hint, default = hints[f.name], _default(f)
        text = (over.help if over.help is not None else f.metadata.get("help", "")).replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "help": text or None}
        base = hint if hint in (int, float, str) else _optional(hint)  # X of X or X | None
        if default is dataclasses.MISSING:
            if base not in (int, float, str, Path):
                raise TypeError(f"{cls.__name__}.{f.name}: a required flag needs a default-free int/float/str/Path")
            kw["required"] = True
        if hint is bool:
            kw.update(action="store_false" if default else "store_true", default=default)
        elif base in (int, float, str, Path):
            named = flag_name(f, over).lstrip("-").replace("-", "_").upper()  # argparse's, from the flag, not dest
            kw.update(
                type=optional_path if base is Path else base,
                default=default,
                choices=over.choices,
                metavar=over.metavar or (None if over.choices else named),
            )
        elif hint == tuple[str, ...]:
            if over.repeat:  # argparse appends to a copy of a list default
                kw.update(action="append", default=list(default), metavar=over.metavar)
            else:
                kw.update(type=comma_list, default=default, metavar=over.metavar or "NAME,…")
        elif hint in (dict[str, float], dict[str, str]):
            word = "AMOUNT" if hint == dict[str, float] else "VALUE"
            kw.update(
                type=key_values(typing.get_args(hint)[1], word),
                default=default,
                metavar=over.metavar or f"NAME={word},…",
            )
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {hint!r}")
        if kw.get("default") is dataclasses.MISSING:
            del kw["default"]
        parser.add_argument(flag_name(f, over), **{k: v for k, v in kw.items() if v is not None or k == "default"})


def field_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from arguments parsed by a parser :func:`add_fields` built."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.init:
            v = getattr(args, f.name)
            out[f.name] = tuple(v) if hints[f.name] == tuple[str, ...] else v
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


#: type -> (accepts a file value, converts it, what the field takes)
_SCALARS: dict[Any, tuple[Callable[[Any], bool], Callable[[Any], Any], str]] = {
    bool: (lambda x: isinstance(x, bool), bool, "true or false"),
    int: (lambda x: isinstance(x, int) and not isinstance(x, bool), int, "an integer"),
    float: (_is_number, float, "a number"),
    str: (lambda x: isinstance(x, str), str, "a string"),
    Path: (lambda x: isinstance(x, str), Path, "a string (a path)"),
    tuple[str, ...]: (
        lambda x: isinstance(x, (list, tuple)) and all(isinstance(i, str) for i in x),
        tuple,
        "a list of strings",
    ),
    list[str]: (
        lambda x: isinstance(x, (list, tuple)) and all(isinstance(i, str) for i in x),
        list,
        "a list of strings",
    ),
    dict[str, float]: (
        lambda x: isinstance(x, Mapping) and all(isinstance(k, str) and _is_number(v) for k, v in x.items()),
        lambda x: {k: float(v) for k, v in x.items()},
        "a mapping of names to numbers",
    ),
    dict[str, str]: (
        lambda x: isinstance(x, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in x.items()),
        dict,
        "a mapping of names to strings",
    ),
}


def check_value(hint: Any, v: Any) -> Any:
    """``v`` as a value of an option with type ``hint`` (a YAML scalar / list / mapping), or raise ValueError saying
    what the option takes."""
    inner = _optional(hint)
    if inner is not None:
        return None if v is None else check_value(inner, v)
    if hint not in _SCALARS:
        raise ValueError(f"a {hint!r} (not settable from a file)")
    ok, convert, what = _SCALARS[hint]
    if not ok(v):
        raise ValueError(what)
    return convert(v)


def check_mapping(
    data: Any,
    checks: Mapping[str, Callable[[Any], Any]],
    source: str,
    unknown_hint: Callable[[list[str]], str] | None = None,
) -> dict[str, Any]:
    """A config file's mapping ``data`` (e.g. YAML) checked key by key: ``checks`` maps each allowed key to a function
    that returns the value or raises ValueError saying what the key takes. ValueError names what is wrong: not a
    mapping, the unknown keys with the allowed ones (plus ``unknown_hint(unknown)``), a value of the wrong type."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: must be a mapping of option names to values, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in checks)
    if unknown:
        hint = unknown_hint(unknown) if unknown_hint is not None else ""
        raise ValueError(f"{source}: unknown key(s) {unknown}{hint}; allowed: {', '.join(checks)}")
    out: dict[str, Any] = {}
    for k, v in data.items():
        try:
            out[k] = checks[k](v)
        except ValueError as e:
            raise ValueError(f"{source}: {k!r} must be {e}, got {v!r}") from None
    return out


def file_values(cls: type, data: Any, source: str) -> dict[str, Any]:
    """The init fields of dataclass ``cls`` given by a config file's mapping ``data``, each checked against its
    field's type (:func:`check_mapping`'s ValueError where not)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    return check_mapping(data, {n: functools.partial(check_value, hints[n]) for n in names}, source)
