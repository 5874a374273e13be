"""A study persisted in a real PostgreSQL server (``EDGETUNE_TEST_POSTGRES_URL``; `.ci/postgres.sh start`
prints one). Skipped, with the reason, when no server is reachable."""

from __future__ import annotations

import os

import optuna
import pytest

from tests.test_tuner_helpers import TINY_ARGS, run_tuner, write_space

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.postgres, pytest.mark.timeout(900)]

URL_ENV = "EDGETUNE_TEST_POSTGRES_URL"


@pytest.fixture(scope="module")
def pg_url() -> str:
    url = os.environ.get(URL_ENV, "")
    if not url:
        pytest.skip(f"{URL_ENV} is not set (start a throwaway server with `.ci/postgres.sh start`)")
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[postgres]'")
    import sqlalchemy

    from tuner.storage import normalise_url

    try:
        with sqlalchemy.create_engine(normalise_url(url), connect_args={"connect_timeout": 5}).connect():
            pass
    except Exception as e:  # noqa: BLE001 - any connection failure means: skip, saying why
        pytest.skip(f"PostgreSQL at {URL_ENV} is not reachable: {type(e).__name__}: {str(e).splitlines()[0]}")
    return url


def test_study_in_postgresql(pg_url, tmp_path):
    from tuner.storage import rdb_storage

    name = f"pg-{os.getpid()}"
    storage = rdb_storage(pg_url)
    try:
        run_tuner(
            [
                *TINY_ARGS,
                "--space",
                str(write_space(tmp_path)),
                "--study",
                name,
                "--trials",
                "2",
                "--epochs",
                "1",
                "--storage",
                pg_url,
                "--out",
                str(tmp_path / "out"),
                "--address",
                "local",
            ],
            tmp_path / "tune.log",
        )
        s = optuna.load_study(study_name=name, storage=storage)
        assert len(s.trials) == 2 and all(t.state.name == "COMPLETE" for t in s.trials)
        assert all({"params", "train_seconds", "checkpoint_uri"} <= set(t.user_attrs) for t in s.trials)
        assert s.user_attrs["dataset"] == "textures"
        assert (tmp_path / "out" / "best" / "metrics.json").is_file()
    finally:
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass
