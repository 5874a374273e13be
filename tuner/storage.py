"""Optuna storage URLs: ``sqlite:///…`` (default ``runs/optuna.db``) or ``postgresql://…`` for a shared study."""

from __future__ import annotations

import importlib.util

from edgetune.errors import ConfigError

SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")


def normalise_url(url: str) -> str:
    """Validate ``url`` and pick the installed PostgreSQL driver.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; the ``postgres`` extra installs psycopg2, so a
    bare URL is routed to ``postgresql+psycopg2://`` when only psycopg2 is present.
    """
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0]
    if not sep or base not in SCHEMES:
        raise ConfigError(f"storage must be an RDB URL (sqlite:///ABS/PATH.db or postgresql://user@host/db), "
                          f"got {url!r}")
    if scheme in ("postgresql", "postgres"):
        has = {m: importlib.util.find_spec(m) is not None for m in ("psycopg", "psycopg2")}
        if has["psycopg"]:
            return f"postgresql+psycopg://{rest}"
        if has["psycopg2"]:
            return f"postgresql+psycopg2://{rest}"
        raise ConfigError("a postgresql:// storage needs a driver: pip install -e '.[postgres]' (psycopg2)")
    return url


def rdb_storage(url: str):  # noqa: ANN201 - optuna.storages.RDBStorage
    import optuna

    return optuna.storages.RDBStorage(normalise_url(url), heartbeat_interval=None)
