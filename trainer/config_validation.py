"""The generic half of :mod:`trainer.config`: value checks, the validated base model, and pydantic's errors worded
as edgetune's.

The section models of :mod:`trainer.config` are :class:`ConfigModel` subclasses (frozen, unknown keys refused) whose
fields use the value types here (:data:`Number`, :data:`Int`, :data:`Bool`, :data:`Str`, :data:`Count`,
:data:`Positive`), a choice list's check (:func:`one_of`) and number bounds (:func:`interval`). The outermost
validation (:func:`user_errors`) turns pydantic's ``ValidationError`` into one :class:`edgetune.errors.ConfigError`
(:func:`explain`) that names each dotted key, says what was wrong and what is allowed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from edgetune.errors import ConfigError


# -- value types: YAML scalars are coerced as before (whole floats to int, numeric strings to float, numbers to
# str); bools are never numbers, numbers never bools. A failed check raises bad(...), worded without the key,
# which explain puts in front. ----------------------------------------------------------------------------------
def bad(what: str) -> PydanticCustomError:
    return PydanticCustomError("edgetune_config", "{what}", {"what": what})


def number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise bad(f"must be a number, got {v!r}")
    try:
        f = float(v)
    except ValueError:
        raise bad(f"must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise bad(f"must be a number, got {f!r}")
    return f


def integer(v: Any) -> int:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"must be an integer, got {v!r}")
    return v


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise bad(f"must be true or false, got {v!r}")
    return v


def string(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise bad(f"must be a string, got {v!r}")
    return str(v)


def items(v: Any, item: Callable[[Any], Any]) -> tuple[Any, ...]:
    if not isinstance(v, (list, tuple)):
        raise bad(f"must be a list, got {v!r}")
    return tuple(item(x) for x in v)


def one_of(allowed: tuple[str, ...]) -> AfterValidator:
    """The check of a choice field against its (single) choice list."""

    def check(v: str) -> str:
        if v not in allowed:
            raise bad(f"must be one of {list(allowed)}, got {v!r}")
        return v

    return AfterValidator(check)


def interval(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Any:
    """``Field`` bounds of a number; explain words a violation as ``must be in [lo, hi], got v``."""
    return Field(
        gt=lo if lo_open else None, ge=None if lo_open else lo, lt=hi if hi_open else None, le=None if hi_open else hi
    )


Number = Annotated[float, BeforeValidator(number)]
Int = Annotated[int, BeforeValidator(integer)]
Bool = Annotated[bool, BeforeValidator(boolean)]
Str = Annotated[str, BeforeValidator(string)]
Count = Annotated[Int, Field(ge=0)]  #: an integer >= 0
Positive = Annotated[Int, Field(ge=1)]  #: an integer >= 1


_state = threading.local()


@contextmanager
def user_errors(root: type[ConfigModel]) -> Iterator[None]:
    """Outermost validation only: pydantic's ValidationError -> ConfigError (nested sections pass theirs up, so
    pydantic reports them with their full location)."""
    if getattr(_state, "active", False):
        yield
        return
    _state.active = True
    try:
        yield
    except ValidationError as e:
        raise ConfigError(explain(e, root)) from None
    finally:
        _state.active = False


class ConfigModel(BaseModel):
    """Frozen; unknown keys are errors; invalid values raise ConfigError, also on direct construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    section: ClassVar[str] = ""  #: dotted prefix of this model's keys in TrainConfig ("" = the top level)

    def __init__(self, **data: Any) -> None:
        with user_errors(type(self)):
            super().__init__(**data)


# -- pydantic's errors, worded as edgetune's ------------------------------------------------------------------
_BOUNDS = ("ge", "gt", "le", "lt")  #: the attributes of the bound objects pydantic keeps in FieldInfo.metadata
_RANGE_ERRORS = {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}
_NOT_A_MAPPING = {"model_type", "model_attributes_type", "dict_type"}


def explain(e: ValidationError, root: type[ConfigModel]) -> str:
    """One message per problem, joined by "; ": unknown keys grouped per section (with the allowed ones),
    then each bad value with its dotted key."""
    unknown: dict[tuple[Any, ...], list[str]] = {}
    lines: list[str] = []
    for err in e.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
        else:
            lines.append(_explain_one(err, loc, root))
    for where, keys in reversed(unknown.items()):
        prefix = _dotted(root, where)
        model = _model_at(root, where)
        lines.insert(
            0,
            f"unknown config key(s) {sorted(f'{prefix}.{k}' if prefix else k for k in keys)}; "
            f"allowed in {prefix or 'the top level'}: {sorted(model.model_fields)}",
        )
    return "; ".join(dict.fromkeys(lines))


def _explain_one(err: Any, loc: tuple[Any, ...], root: type[ConfigModel]) -> str:
    name = _dotted(root, loc)
    got = err.get("input")
    if err["type"] == "edgetune_config":
        return f"{name} {err['msg']}"
    if err["type"] in _NOT_A_MAPPING:
        return f"config section {name or '<root>'} must be a mapping, got {got!r}"
    if err["type"] in _RANGE_ERRORS:
        field = _model_at(root, loc[:-1]).model_fields[str(loc[-1])]
        b = {k: getattr(m, k) for m in field.metadata for k in _BOUNDS if getattr(m, k, None) is not None}
        if field.annotation is int and set(b) == {"ge"}:
            return f"{name} must be an integer >= {b['ge']}, got {got!r}"
        lo, hi = b.get("ge", b.get("gt")), b.get("le", b.get("lt"))
        return f"{name} must be in {'(' if 'gt' in b else '['}{lo}, {hi}{')' if 'lt' in b else ']'}, got {got!r}"
    return f"{name}: {err['msg']}, got {got!r}"


def _dotted(root: type[ConfigModel], loc: tuple[Any, ...]) -> str:
    """("model", "head") -> "model.head"; an item of a list field -> "data.expand item"."""
    parts = [root.section] if root.section else []
    parts += [str(p) for p in loc if isinstance(p, str)]
    return ".".join(parts) + (" item" if loc and not isinstance(loc[-1], str) else "")


def _model_at(root: type[ConfigModel], loc: tuple[Any, ...]) -> type[ConfigModel]:
    model = root
    for p in loc:
        ann = model.model_fields[str(p)].annotation
        if not (isinstance(ann, type) and issubclass(ann, ConfigModel)):
            break
        model = ann
    return model
