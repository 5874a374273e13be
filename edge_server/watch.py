"""``--watch``: poll the bundle path and hot-swap when a different valid bundle appears there.

Deploy by replacing the directory's contents (or flipping a symlink to a new bundle directory).
A bundle that fails to load (e.g. half copied) is logged once and retried when it changes; the
old model keeps serving meanwhile.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from edge_server.model import ModelHolder
from edgetune.bundle import MANIFEST
from edgetune.errors import EdgetuneError

log = logging.getLogger("edge_server.watch")


class BundleWatcher:
    def __init__(self, holder: ModelHolder, path: str | Path, interval_s: float = 2.0) -> None:
        self.holder = holder
        self.path = Path(path)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._failed: tuple[str, float] | None = None
        self._thread = threading.Thread(target=self._run, name="edge-bundle-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _manifest_state(self) -> tuple[str, float] | None:
        manifest = self.path / MANIFEST
        try:
            st = manifest.stat()
            sha = json.loads(manifest.read_text()).get("onnx_sha256", "")
        except (OSError, ValueError, AttributeError):
            return None
        return str(sha), st.st_mtime

    def refused_current(self) -> bool:
        """Whether the bundle now in the watched directory has been tried and refused (the previous model still
        serves): a state that tests and tools can wait for."""
        state = self._manifest_state()
        return state is not None and state == self._failed

    def check_once(self) -> bool:
        """Swap if the watched bundle changed; returns True when a swap happened."""
        state = self._manifest_state()
        if state is None or state[0] == self.holder.current.bundle.sha256 or state == self._failed:
            return False
        try:
            self.holder.load(self.path)
        except EdgetuneError as e:
            self._failed = state
            log.error(
                "watched bundle changed but cannot be loaded; previous model still serving",
                extra={"fields": {"bundle": str(self.path), "error": str(e)}},
            )
            return False
        self._failed = None
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception:  # never let the watcher die silently
                log.exception("bundle watch failed", extra={"fields": {"bundle": str(self.path)}})
