"""Shipped configs parse and validate; the default search space references valid config keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from edgetune.errors import ConfigError
from trainer.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_is_valid(path: Path) -> None:
    cfg = TrainConfig.from_yaml(path)
    from trainer.backbones import get_backbone_info

    get_backbone_info(cfg.model.backbone)


def test_configs_exist() -> None:
    assert {p.stem for p in CONFIGS} >= {"graphite", "waste_resnext50", "rock_resnet34", "elpv_lite0"}


# -- the config models: frozen, typed, validated once, errors name the dotted key and what is allowed --------------
def test_configs_are_frozen_and_replace_returns_a_new_validated_copy() -> None:
    cfg = TrainConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.epochs = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.model.head = "mlp"  # type: ignore[misc]
    new = cfg.replace({"model.head": "mlp", "optim.lr": "3e-4", "epochs": 2.0})
    assert (new.model.head, new.optim.lr, new.epochs) == ("mlp", 3e-4, 2) and type(new.epochs) is int
    assert cfg == TrainConfig() and cfg.model.head == "linear"
    assert hash(new) != hash(cfg) and hash(TrainConfig()) == hash(cfg)


def test_to_dict_is_plain_json_and_reads_back() -> None:
    import json
    import pickle

    cfg = TrainConfig().replace({"loss.alpha": [1, 2], "data.expand": ["hflip"], "model.head_hidden": [64, 32]})
    d = cfg.to_dict()
    assert d["data"]["split"] == [0.7, 0.15, 0.15] and d["model"]["head_hidden"] == [64, 32]
    assert d["loss"]["alpha"] == [1.0, 2.0] and d["data"]["expand"] == ["hflip"]
    assert json.loads(json.dumps(d)) == d
    back = TrainConfig.from_dict(d)
    assert back == cfg and back.model.head_hidden == (64, 32) and back.loss.alpha == (1.0, 2.0)
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # Ray ships configs by pickle


@pytest.mark.parametrize(
    "key,allowed",
    [
        ("optim.optimizer", "OPTIMIZERS"),
        ("optim.schedule", "SCHEDULES"),
        ("model.head", "HEADS"),
        ("data.augment", "AUG_PRESETS"),
        ("data.sampler", "SAMPLERS"),
        ("model.bn_stats", "BN_STATS"),
        ("data.cache_images", "CACHE_IMAGES"),
        ("data.activation_cache", "ACTIVATION_CACHE"),
        ("data.activation_dtype", "ACTIVATION_DTYPES"),
    ],
)
def test_each_choice_field_accepts_exactly_its_list(key: str, allowed: str) -> None:
    from trainer import config

    values = getattr(config, allowed)
    section, name = key.split(".")
    for v in values:
        assert getattr(getattr(TrainConfig().replace({key: v}), section), name) == v
    with pytest.raises(ConfigError, match=re.escape(f"{key} must be one of {list(values)}, got 'nope'")):
        TrainConfig().replace({key: "nope"})


def test_value_errors_name_the_key_what_was_wrong_and_what_is_allowed() -> None:
    cases = {
        "data.expand": (["hflip", "twist"], "data.expand item must be one of ['hflip', 'vflip', 'rot90', 'affine']"),
        "data.split": ([0.5, 0.5], "data.split must be three non-negative ratios (train, val, test), got (0.5, 0.5)"),
        "data.slice_grid": ([0, 2], "data.slice_grid must be two integers in [1, 16] (rows, cols)"),
        "data.max_images": (2.5, "data.max_images must be an integer, got 2.5"),
        "data.strict": ("yes", "data.strict must be true or false, got 'yes'"),
        "data.dataset": ("", "data.dataset must be a built-in name (elpv, textures) or a path"),
        "model.freeze": (2.5, "model.freeze above 1 is a layer count and must be whole, got 2.5"),
        "model.head_hidden": ([1], "model.head_hidden must be two positive integers, got (1,)"),
        "model.img_size": (16, "model.img_size must be 0 (backbone default) or in [32, 1024], got 16"),
        "model.bn_images": (-1, "model.bn_images must be an integer >= 0, got -1"),
        "loss.alpha": ([1, -1], "loss.alpha must be null, 'auto', 'sqrt' or a list of non-negative class weights"),
        "loss.gamma": ("nan", "loss.gamma must be a number, got nan"),
        "optim.lr": (0, "optim.lr must be in (0.0, 10.0], got 0"),
        "optim.momentum": (1, "optim.momentum must be in [0.0, 1.0), got 1"),
        "epochs": (True, "epochs must be an integer, got True"),
        "batch_size": (0, "batch_size must be an integer >= 1, got 0"),
        "metric": ("x", "metric must be one of ['val_macro_f1'"),
        "use_gpu": (1, "use_gpu must be true or false, got 1"),
        "out": (None, "out must be a string, got None"),
        "model": (1, "config section model must be a mapping, got 1"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrainConfig().replace({key: value})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"model": {"head": "x", "dropout": 2, "q": 1}, "foo": 3, "epochs": 0})
    msg = str(e.value)
    for part in (
        "unknown config key(s) ['model.q']; allowed in model: ['backbone',",
        "unknown config key(s) ['foo']; allowed in the top level: ['amp',",
        "model.head must be one of ['linear', 'mlp'], got 'x'",
        "model.dropout must be in [0.0, 1.0), got 2",
        "epochs must be an integer >= 1, got 0",
    ):
        assert part in msg, (part, msg)


def test_section_configs_built_directly_are_validated_with_their_dotted_keys() -> None:
    from trainer.config import DataConfig, LossConfig, ModelConfig, OptimConfig

    assert ModelConfig(backbone="resnet18", weights="none", img_size=64.0).img_size == 64  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=re.escape("model.dropout must be in [0.0, 1.0), got 1.5")):
        ModelConfig(dropout=1.5)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['model.backbon'\]; allowed in model"):
        ModelConfig(backbon="resnet18")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="data.split ratios must be > 0 and sum to 1"):
        DataConfig(split=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="loss.alpha must be null"):
        LossConfig(alpha="often")
    with pytest.raises(ConfigError, match=r"optim.optimizer must be one of \['adam', 'adamw', 'sgd'\]"):
        OptimConfig(optimizer="rmsprop")
    with pytest.raises(ConfigError, match="model.head must be one of"):
        TrainConfig(model={"head": "x"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"config section <root> must be a mapping"):
        TrainConfig.from_dict([1])  # type: ignore[arg-type]
