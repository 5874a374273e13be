"""The served model (bundle + runner + batcher) and its hot swap."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_server.batcher import MicroBatcher
from edge_server.runners import Runner, get_runner
from edgetune.bundle import Bundle, load_bundle
from edgetune.errors import BundleError, ConfigError

log = logging.getLogger("edge_server.model")

#: How a micro-batch waits: adaptive (only for images already being decoded) or fixed (up to max_wait_ms).
BATCH_WAITS = ("adaptive", "fixed")


@dataclass(frozen=True, kw_only=True)
class RunnerOptions:
    """How to build a runner and batcher for each (re)loaded bundle.

    The one declaration of these fields: :class:`edge_server.server.ServerConfig` extends this class and hands
    :class:`ModelHolder` its :meth:`~edge_server.server.ServerConfig.runner_options`.
    """

    backend: str = "auto"
    max_batch: int = 8
    max_wait_ms: float = 2.0
    batch_wait: str = "adaptive"  #: adaptive (wait only for images already being decoded) or fixed
    intra_op_threads: int = 0
    precision: str = "fp16"

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or not 1 <= self.max_batch <= 1024:
            raise ConfigError(f"max_batch must be an integer in 1..1024, got {self.max_batch!r}")
        if not isinstance(self.max_wait_ms, (int, float)) or not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"max_wait_ms must be in [0, 10000] ms, got {self.max_wait_ms!r}")
        if self.batch_wait not in BATCH_WAITS:
            raise ConfigError(f"batch_wait must be {' or '.join(map(repr, BATCH_WAITS))}, got {self.batch_wait!r}")


@dataclass
class ServedModel:
    bundle: Bundle
    batcher: MicroBatcher

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def runner(self) -> Any:
        return self.batcher.runner


def check_runner_matches_bundle(runner: Runner, bundle: Bundle) -> None:
    """Run one blank image through ``runner``: the model must take the spec's input size and give one logit
    per label. Raises :class:`BundleError` naming both numbers (at startup, on every LoadModel and --watch swap)."""
    h, w = bundle.spec.input_size
    try:
        out = np.asarray(runner.infer(np.zeros((1, 3, h, w), np.float32)))
    except Exception as e:  # backends raise their own types; the message says what the model rejected
        raise BundleError(
            f"bundle {bundle.path}: the model does not run on a 1x3x{h}x{w} input (preprocess "
            f"input_size {[h, w]}): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if out.ndim != 2 or out.shape[0] != 1:
        raise BundleError(
            f"bundle {bundle.path}: the model's output has shape {list(out.shape)} for one image; "
            "expected [1, number of labels]"
        )
    if out.shape[1] != len(bundle.labels):
        raise BundleError(
            f"bundle {bundle.path}: bundle.json has {len(bundle.labels)} labels but the model has "
            f"{out.shape[1]} outputs; the labels must match the model's classes (re-export the bundle)"
        )
    if not np.isfinite(out).all():
        raise BundleError(f"bundle {bundle.path}: the model gives non-finite logits on a blank image")


class ModelHolder:
    """Holds the current :class:`ServedModel`; ``load`` swaps it without interrupting callers.

    Callers read ``current`` per image. A swap builds the new runner first (a failure leaves the
    old model serving), publishes it, then closes the old batcher, which finishes the images
    already queued on it.
    """

    def __init__(
        self, bundle_path: str | Path, options: RunnerOptions, on_batch: Callable[[int], Any] | None = None
    ) -> None:
        self.options = options
        self._on_batch = on_batch
        self._swap_lock = threading.Lock()
        self._current = self._build(load_bundle(bundle_path))
        self.bundle_source = Path(bundle_path)

    def _build(self, bundle: Bundle) -> ServedModel:
        o = self.options
        runner = get_runner(
            o.backend, bundle, max_batch_size=o.max_batch, intra_op_threads=o.intra_op_threads, precision=o.precision
        )
        try:
            check_runner_matches_bundle(runner, bundle)
            batcher = MicroBatcher(
                runner,
                max_batch=o.max_batch,
                max_wait_ms=o.max_wait_ms,
                adaptive=o.batch_wait == "adaptive",
                on_batch=self._on_batch,
            )
        except Exception:
            runner.close()
            raise
        return ServedModel(bundle=bundle, batcher=batcher)

    @property
    def current(self) -> ServedModel:
        return self._current

    def load(self, bundle_path: str | Path) -> ServedModel:
        """Load ``bundle_path`` and make it current; raises (old model kept) if it is invalid."""
        with self._swap_lock:
            new = self._build(load_bundle(bundle_path))
            old, self._current = self._current, new
            self.bundle_source = Path(bundle_path)
        log.info(
            "model swapped",
            extra={
                "fields": {
                    "old_version": old.version,
                    "new_version": new.version,
                    "bundle": str(bundle_path),
                    "backend": new.runner.name,
                }
            },
        )
        threading.Thread(target=old.batcher.close, name="edge-retire-model", daemon=True).start()
        return new

    def close(self) -> None:
        self._current.batcher.close()
