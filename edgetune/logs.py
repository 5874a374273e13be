"""The one console logging setup of the trainer and tuner command lines.

Library code under ``edgetune``, ``trainer`` and ``tuner`` logs through module loggers
(``log = logging.getLogger(__name__)``) and never prints progress itself; each command-line entry point
(``python -m trainer``, ``python -m tuner``, ``python -m trainer.export``, ``python -m tuner.report``,
``python -m tuner.dashboard``) calls :func:`setup_cli_logging` once. Messages then read ``edgetune: <message>``:
information on stdout, warnings and errors on stderr (the streams the CLIs used before they logged).

The edge server and client keep their own structured logs (``edge_server/logs.py``).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["CLI_LOGGERS", "CliHandler", "setup_cli_logging"]

#: the library loggers the CLI handler is attached to (their children, module loggers, propagate to them)
CLI_LOGGERS = ("edgetune", "trainer", "tuner")
CLI_FORMAT = "edgetune: %(message)s"


class CliHandler(logging.Handler):
    """``edgetune: <message>`` to stdout (below WARNING) or stderr (WARNING and up).

    The stream is looked up at each record, so a replaced ``sys.stdout``/``sys.stderr`` (pytest's capture, a
    redirect) gets the message, not the stream that was current when the handler was made."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter(CLI_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(msg + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report through handleError, never raise
            self.handleError(record)


def setup_cli_logging(verbose: bool = False) -> None:
    """Attach the CLI handler to the library loggers at INFO (DEBUG with ``verbose``).

    Idempotent: a second call (a CLI ``main`` run twice in one process) only updates the level, it never adds a
    second handler, so no message is written twice."""
    level = logging.DEBUG if verbose else logging.INFO
    for name in CLI_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, CliHandler) for h in logger.handlers):
            logger.addHandler(CliHandler())
