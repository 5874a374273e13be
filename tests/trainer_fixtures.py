"""Small real training runs shared by trainer/export/tuner tests (textures photos, 64 px, few images)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig

TINY: dict[str, Any] = {
    "data": {"dataset": "textures", "max_images": 60},
    "model": {"backbone": "efficientnet_lite0", "img_size": 64, "freeze": 1.0},
    "optim": {"lr": 3e-3},
    "epochs": 1,
    "batch_size": 16,
    "progress": False,
    "threads": 2,
}


def tiny_config(**overrides: Any) -> TrainConfig:
    """The tiny config with dotted overrides, e.g. ``tiny_config(**{"model.backbone": "resnet18"})``."""
    return TrainConfig.from_dict(TINY).replace(overrides)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGETUNE_CACHE", str(Path.home() / ".cache" / "edgetune")))
