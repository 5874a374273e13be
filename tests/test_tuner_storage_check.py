"""An unreachable Optuna storage fails at once, in one line, before any data or backbone work (#12)."""

from __future__ import annotations

import time

import pytest

URL = "postgresql://u:secret@127.0.0.1:1/db"  # port 1: nothing listens, the connection is refused at once


def test_unreachable_postgresql_fails_in_one_line_before_data_prep(tmp_path, monkeypatch, capsys):
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[postgres]'")
    import tuner.run
    from tuner.__main__ import main

    def no_prep(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("data were prepared before the storage was checked")

    monkeypatch.setattr(tuner.run, "prepare_study_data", no_prep)
    monkeypatch.setattr(tuner.run, "base_config", no_prep)
    t0 = time.monotonic()
    rc = main(["--data", "textures", "--storage", URL, "--out", str(tmp_path / "out"), "--address", "local"])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("error: cannot open the Optuna storage postgresql://u:***@127.0.0.1:1/db: "), err
    assert "secret" not in err
    assert "Traceback" not in err
    assert took < 15, f"took {took:.1f} s"


def test_the_dashboard_never_prints_a_postgresql_password(monkeypatch, capsys):
    """`make dashboard STORAGE=postgresql://user:pw@…` says which storage it serves with the password masked (the
    app and the HTTP server are replaced: what is printed is the point, serving is tests/test_tuner_study.py's)."""
    from tuner import dashboard

    class Server:
        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            pass

    seen = []
    monkeypatch.setattr(dashboard, "make_app", lambda storage: seen.append(storage) or (lambda env, start: []))
    monkeypatch.setattr(dashboard, "make_server", lambda host, port, app: Server())
    url = "postgresql://edgetune:s3cr3t-pw@db.example:5432/studies"
    assert dashboard.main(["--storage", url, "--port", "0"]) == 0
    out = capsys.readouterr()
    assert seen == [url]  # the real URL reaches the storage
    assert "s3cr3t" not in out.out + out.err and "postgresql://edgetune:***@db.example:5432/studies" in out.out
