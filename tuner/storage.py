"""Optuna storage URLs: ``sqlite:///…`` (default ``runs/optuna.db``) or ``postgresql://…`` for a shared study."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from edgetune.errors import ConfigError, EdgetuneError

SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")


def normalise_url(url: str) -> str:
    """Validate ``url`` and pick the installed PostgreSQL driver.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; the ``postgres`` extra installs psycopg2, so a
    bare URL is routed to ``postgresql+psycopg2://`` when only psycopg2 is present.
    """
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0]
    if not sep or base not in SCHEMES:
        raise ConfigError(
            f"storage must be an RDB URL (sqlite:///ABS/PATH.db or postgresql://user@host/db), got {url!r}"
        )
    if scheme in ("postgresql", "postgres"):
        has = {m: importlib.util.find_spec(m) is not None for m in ("psycopg", "psycopg2")}
        if has["psycopg"]:
            return f"postgresql+psycopg://{rest}"
        if has["psycopg2"]:
            return f"postgresql+psycopg2://{rest}"
        raise ConfigError("a postgresql:// storage needs a driver: pip install -e '.[postgres]' (psycopg2)")
    return url


def rdb_storage(url: str) -> Any:
    """An ``optuna.storages.RDBStorage`` on ``url`` (typed Any: tuner/report.py rebinds its ``storage: str`` to it)."""
    import optuna

    return optuna.storages.RDBStorage(normalise_url(url), heartbeat_interval=None)


def masked(url: str) -> str:
    """The URL with its password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def missing_sqlite(url: str) -> str | None:
    """Why a read-only command cannot open ``url`` (a SQLite file that does not exist: opening it would create an
    empty one), or None. One check for the dashboard and the study listing."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        return f"no study storage at {masked(url)}; run `make tune` first (or give STORAGE=)"
    return None


def check_storage(url: str, timeout_s: float = 10.0) -> None:
    """Open the storage once before any work: an unreachable or unusable one fails in one line naming the URL
    (password masked) and the cause."""
    import sqlalchemy

    norm = normalise_url(url)
    if norm.startswith("sqlite:///"):
        db = Path(norm[len("sqlite:///") :])
        if not db.parent.is_dir():
            raise EdgetuneError(f"storage {url}: folder {db.parent} does not exist")
        return
    args = {"connect_timeout": int(timeout_s)} if norm.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(norm, connect_args=args)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # noqa: BLE001 - driver errors vary; the first line says what happened
        cause = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise EdgetuneError(f"cannot open the Optuna storage {masked(url)}: {cause}") from None
