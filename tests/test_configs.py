"""Shipped configs parse and validate; the default search space references valid config keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_is_valid(path: Path) -> None:
    cfg = TrainConfig.from_yaml(path)
    from trainer.backbones import get_backbone_info

    get_backbone_info(cfg.model.backbone)


def test_configs_exist() -> None:
    assert {p.stem for p in CONFIGS} >= {"graphite", "waste_resnext50", "rock_resnet34", "elpv_lite0"}
