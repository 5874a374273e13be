"""Versions of the server-side stack (reported by GetModelInfo)."""

from __future__ import annotations

import functools
import importlib.metadata
import platform


@functools.lru_cache(maxsize=1)
def server_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "edgetune",
        "grpcio",
        "protobuf",
        "onnxruntime",
        "onnxruntime-gpu",
        "numpy",
        "opencv-python-headless",
        "tensorrt",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
