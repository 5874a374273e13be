"""Self-describing checkpoints: weights + full config + class names + preprocessing spec + versions.

A checkpoint is one file ``model.pt`` (``torch.save`` of a plain dict) inside a checkpoint
directory, next to a human-readable ``checkpoint.json`` with everything but the weights.
``load_checkpoint`` accepts the file, the directory, or a run directory (then ``best/``).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy
import torch
import torchvision

import edgetune
from edgetune.errors import EdgetuneError
from edgetune.fsutil import atomic_path
from edgetune.preprocess import PreprocessSpec

CHECKPOINT_FORMAT = "edgetune-checkpoint"
#: Version of the checkpoint metadata schema (``checkpoint.json`` and the ``meta`` inside ``model.pt``).
#: 1: ``format_version`` 1, no ``schema_version`` (read through :func:`_migrate`); 2: ``schema_version``.
CHECKPOINT_SCHEMA_VERSION = 2
WEIGHTS_FILE = "model.pt"
META_FILE = "checkpoint.json"
#: Keys every checkpoint's metadata carries (the writer is :func:`save_checkpoint`, the reader :func:`read_meta`).
REQUIRED_META = (
    "format",
    "schema_version",
    "config",
    "classes",
    "preprocess",
    "backbone",
    "epoch",
    "metrics",
    "versions",
)
#: Keys the training loop adds (optional in schema 2, absent from checkpoints written before them): the weight set
#: the backbone started from (``weights_tag``, :func:`trainer.backbones.weights_tag_of`), its file
#: (``weights_source``), the freeze report (``freeze``), and the run's dataset, history, BN statistics, data path.
OPTIONAL_META = (
    "weights_tag",
    "weights_source",
    "freeze",
    "dataset",
    "dataset_hash",
    "history",
    "bn_stats",
    "data_path",
)


def versions() -> dict[str, str]:
    """Versions of everything that decides whether a checkpoint or bundle reproduces."""
    out = {
        "edgetune": edgetune.__version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": str(numpy.__version__),
    }
    try:
        import cv2

        out["opencv"] = cv2.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, torch.nn.Module) else model


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    config: dict[str, Any],
    classes: list[str],
    spec: PreprocessSpec,
    epoch: int,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory/model.pt`` and ``directory/checkpoint.json`` atomically; returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    module = unwrap(model)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "schema_version": CHECKPOINT_SCHEMA_VERSION,
        "config": config,
        "classes": list(classes),
        "preprocess": spec.to_dict(),
        "backbone": config.get("model", {}).get("backbone"),
        "epoch": int(epoch),
        "metrics": _jsonable(metrics),
        "versions": versions(),
        **(extra or {}),
    }
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    with atomic_path(d / WEIGHTS_FILE) as tmp:
        torch.save({"meta": meta, "model_state": state}, tmp)
    (d / META_FILE).write_text(json.dumps(meta, indent=2))
    return d


def resolve_checkpoint_path(path: str | Path) -> Path:
    """model.pt file, a checkpoint directory, or a run directory (uses its ``best/``)."""
    p = Path(path)
    candidates = [p, p / WEIGHTS_FILE, p / "best" / WEIGHTS_FILE, p / "checkpoint" / WEIGHTS_FILE]
    for c in candidates:
        if c.is_file():
            return c
    raise EdgetuneError(f"no edgetune checkpoint at {p}: looked for {', '.join(str(c) for c in candidates[1:])}")


#: What reading a damaged file raises (truncated, not an archive), as opposed to a refused content or a bad schema.
DAMAGED_FILE_ERRORS = (OSError, EOFError, RuntimeError)


class UnreadableCheckpoint(EdgetuneError):
    """``model.pt`` could not be read. ``damaged``: the file itself is (truncated, not an archive), as opposed to
    an archive holding something ``weights_only`` loading refuses."""

    def __init__(self, message: str, damaged: bool) -> None:
        super().__init__(message)
        self.damaged = damaged


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict ``{"meta": {...}, "model_state": {...}}`` on CPU, validated."""
    f = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise UnreadableCheckpoint(
            f"{f} is not a readable edgetune checkpoint ({type(e).__name__}: {e})",
            damaged=isinstance(e, DAMAGED_FILE_ERRORS),
        ) from None
    ckpt["meta"] = validate_meta(ckpt.get("meta") if isinstance(ckpt, dict) else None, f)
    ckpt["path"] = str(f)
    return ckpt


def read_meta(path: str | Path) -> dict[str, Any]:
    """The validated metadata of a checkpoint (its ``checkpoint.json``; no weights are loaded)."""
    f = resolve_checkpoint_path(path).with_name(META_FILE)
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise EdgetuneError(f"{f} is not readable checkpoint metadata ({type(e).__name__}: {e})") from None
    return validate_meta(meta, f)


def validate_meta(meta: Any, where: str | Path) -> dict[str, Any]:
    """The one check of checkpoint metadata: format, ``schema_version`` (older schemas migrated), required keys."""
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise EdgetuneError(f"{where} is not an edgetune checkpoint (no edgetune metadata)")
    meta = _migrate(dict(meta))
    version = meta.get("schema_version")
    if version != CHECKPOINT_SCHEMA_VERSION:
        raise EdgetuneError(
            f"{where}: checkpoint schema_version {version!r} is not supported; this edgetune reads checkpoint "
            f"schema_version {CHECKPOINT_SCHEMA_VERSION} (and migrates 1); retrain with this edgetune or use the "
            "edgetune release that wrote it"
        )
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise EdgetuneError(f"{where}: checkpoint metadata lacks {missing} (schema_version {version})")
    return meta


def _migrate(meta: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 (``format_version`` 1, no ``schema_version``) had the same fields: it is read as schema 2."""
    if "schema_version" not in meta and meta.get("format_version") == 1:
        meta.pop("format_version")
        meta["schema_version"] = CHECKPOINT_SCHEMA_VERSION
    return meta


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        try:
            return x.item()
        except (ValueError, RuntimeError):
            return x.tolist()
    return x
