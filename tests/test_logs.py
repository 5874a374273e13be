"""edgetune.logs: one console setup for the trainer and tuner CLIs; library code logs, it does not print (#12)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgetune.logs import CLI_LOGGERS, CliHandler, setup_cli_logging


@pytest.fixture()
def clean_loggers() -> Iterator[None]:
    """The library loggers as a fresh process has them (no CLI handler), restored afterwards."""
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in CLI_LOGGERS}
    for n in CLI_LOGGERS:
        lg = logging.getLogger(n)
        for h in [h for h in lg.handlers if isinstance(h, CliHandler)]:
            lg.removeHandler(h)
        lg.setLevel(logging.NOTSET)
    yield
    for n, (level, handlers) in saved.items():
        lg = logging.getLogger(n)
        lg.setLevel(level)
        lg.handlers[:] = handlers


def test_info_to_stdout_warnings_to_stderr_with_the_prefix(
    clean_loggers: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_cli_logging()
    setup_cli_logging()  # a CLI main run twice in one process: still one handler, each message once
    logging.getLogger("tuner.run").info("dataset x: 1 train")
    logging.getLogger("trainer.data").warning("skipping 1 file")
    logging.getLogger("edgetune.bundle").debug("not shown at INFO")
    logging.getLogger("optuna").info("not ours: no CLI handler")
    out, err = capsys.readouterr()
    assert out == "edgetune: dataset x: 1 train\n"
    assert err == "edgetune: skipping 1 file\n"
    setup_cli_logging(verbose=True)
    logging.getLogger("trainer.data").debug("train: 12 images")
    assert capsys.readouterr().out == "edgetune: train: 12 images\n"


def test_library_messages_are_logged_not_printed(
    clean_loggers: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Without the CLI setup the library writes nothing to the console; with it each message appears once."""
    from tuner.launcher import forward

    def run(cmd: list[str], check: bool = False) -> SimpleNamespace:
        return SimpleNamespace(returncode=0)

    assert forward("cluster.yaml", "10.0.0.5", ["--data", "d"], "s", str(tmp_path / "o"), run=run) == 0
    assert capsys.readouterr() == ("", "")
    setup_cli_logging()
    forward("cluster.yaml", "10.0.0.5", ["--data", "d"], "s", str(tmp_path / "o"), run=run)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(ln.startswith("edgetune: ") for ln in lines)
    assert "is up (head 10.0.0.5)" in lines[0] and lines[1].startswith("edgetune: $ ") and " exec " in lines[1]


def test_skipped_files_are_reported_once_on_stderr(
    clean_loggers: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The unreadable-file notice was printed and logged (and printed again by the trainer run): now one line."""
    from tests.test_data import SPEC32, cfg, make_folder
    from trainer.data import build_data

    root = make_folder(tmp_path / "ds", per_class=4)
    (root / "grass" / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    setup_cli_logging()
    d = build_data(cfg(root, str(tmp_path / "cache")), SPEC32)
    assert len(d.skipped) == 1
    out, err = capsys.readouterr()
    assert out == ""  # the per-split load timings are DEBUG (shown with --verbose)
    assert err.count("\n") == 1 and err.startswith("edgetune: skipping 1 unreadable or non-image file(s) in ")
    assert "garbage.jpg: " in err  # the reason too, as the trainer's own (removed) second line had it
