"""The device contract the tuner and the edge share: what a target device is called, what it can time and run.

One definition each, imported by both sides (the tuner's device-in-the-loop search, the edge node, the engine builder
and the server's runners), so the core is the only thing they have in common:

* an edge node carries the Ray custom resource ``edge_target:<target>`` (:data:`RESOURCE_PREFIX`, target names by
  :func:`valid_target`), and joins a cluster that uses token authentication where a token exists
  (:func:`token_available`);
* engines come in :data:`PRECISIONS` (``--precision`` takes :data:`PRECISION_CHOICES`);
* a timing uses one of :data:`TIMING_BACKENDS` with the :class:`TimingProtocol` every candidate is timed with.

Standard library only.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from edgetune.errors import ConfigError

#: The custom resource an edge node carries is ``edge_target:<target>``.
RESOURCE_PREFIX = "edge_target:"
TARGET_RULE = "1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit)"
_TARGET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: Precisions of a TensorRT engine (ONNX Runtime serves fp32 and the bundle's INT8 variant).
PRECISIONS = ("fp32", "fp16", "int8")
#: ``make engine PRECISION=`` / ``--precision``: ``auto`` picks the fastest the device supports.
PRECISION_CHOICES = ("auto", *PRECISIONS)
#: Backends a timing can use: ``auto`` = TensorRT where it imports, else ONNX Runtime (as ``make serve``).
TIMING_BACKENDS = ("auto", "tensorrt", "onnxruntime")


def valid_target(target: object) -> bool:
    """Whether ``target`` is a valid target name (:data:`TARGET_RULE`)."""
    return isinstance(target, str) and bool(_TARGET.match(target))


def token_available() -> bool:
    """Whether a Ray auth token is at hand: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``
    (where ``ray start --head`` / ``ray.init`` write it)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").is_file()


@dataclass(frozen=True)
class TimingProtocol:
    """How one architecture is timed: the same for every candidate, every target and the benchmark."""

    warmup: int = 20  #: untimed runs first (allocator, kernels, caches)
    runs: int = 100  #: timed runs; p50 and p90 are taken over them
    batch: int = 1
    threads: int = 1  #: ONNX Runtime intra-op threads (1: what one camera stream gets on a small board)

    def __post_init__(self) -> None:
        for name, lo, hi in (("warmup", 0, 10_000), ("runs", 3, 100_000), ("batch", 1, 256), ("threads", 0, 256)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"timing {name} must be an integer in [{lo}, {hi}], got {v!r}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
