"""Search space YAML -> define-by-run; weights filtering; seeds; validation errors."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from edgetune.errors import ConfigError
from trainer.config import TrainConfig
from tuner.space import DEFAULT_SPACE, load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _only_lite(name: str) -> tuple[bool, str]:
    return (name.startswith("efficientnet_lite"), "no weights file found (test)")


def test_default_space_has_the_issue_parameters():
    s = load_space(layer_count=lambda b: 100)
    assert {
        "backbone",
        "img",
        "freeze",
        "optimizer",
        "lr",
        "lr_sgd",
        "backbone_lr_mult",
        "dropout",
        "label_smoothing",
        "balance",
        "gamma",
        "augment",
        "head",
        "head_hidden",
    } <= set(s.params)
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2", "resnet34"} <= set(
        s.backbones
    )
    # LR range per optimizer: each is only suggested for its optimizer
    assert s.params["lr"].when == {"optimizer": ["adamw"]} and s.params["lr_sgd"].when == {"optimizer": ["sgd"]}
    assert s.params["lr"].log and s.params["lr_sgd"].low >= 10 * s.params["lr"].low
    assert "flips" in s.params["augment"].choices and "dihedral" in s.params["augment"].choices
    names = [x["name"] for x in s.seeds]
    assert names[0].startswith("generic recipe") and any("graphite" in n for n in names)
    assert any("waste" in n for n in names)


def test_conditional_parameters_define_by_run():
    s = load_space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_hidden = {"mlp": 0, "linear": 0}
    for _ in range(30):
        t = study.ask()
        s.define_by_run(t)
        seen_hidden[t.params["head"]] += "head_hidden" in t.params
        if t.params["head"] == "linear":
            assert "head_hidden" not in t.params
        assert ("lr" in t.params) == (t.params["optimizer"] == "adamw")
        assert ("lr_sgd" in t.params) == (t.params["optimizer"] == "sgd")
        study.tell(t, 0.5)
    assert seen_hidden["mlp"] > 0 and seen_hidden["linear"] == 0


def test_to_overrides_maps_onto_train_config_keys():
    from tuner.trial import build_trial_config

    s = load_space()
    over = s.to_overrides(
        {
            "backbone": "efficientnet_lite0",
            "head": "mlp",
            "head_hidden": "512x256",
            "lr_sgd": 3e-2,
            "optimizer": "sgd",
            "balance": "sampler",
            "img": 160,
        }
    )
    assert over["model.head_hidden"] == [512, 256] and over["optim.lr"] == 3e-2
    assert over["data.sampler"] == "balanced" and "loss.alpha" not in over
    cfg = build_trial_config(TrainConfig(), over)
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.optim.lr == 3e-2 and cfg.model.img_size == 160
    assert s.to_overrides({"balance": "sqrt"}) == {"loss.alpha": "sqrt"} and s.to_overrides({"balance": "none"}) == {}
    with pytest.raises(ConfigError, match="not in the search space"):
        s.to_overrides({"nope": 1})


def test_fixed_parameters_leave_the_space_and_the_seeds():
    s = load_space(fixed={"img": 96})
    assert "img" not in s.params
    assert all("img" not in x["params"] for x in s.seeds)


def test_unavailable_weights_are_left_out_with_reason(capsys):
    s = load_space(weights_check=_only_lite, layer_count=lambda b: 100)
    assert s.backbones == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert any("backbone resnet34 left out: no weights file found" in r for r in s.dropped)
    # seeds whose backbone left are dropped too, with a reason; the Lite recipes stay
    assert [x["name"] for x in s.seeds] == [
        "generic recipe (EfficientNet-Lite0, first blocks frozen)",
        "generic recipe (EfficientNet-Lite0, full fine-tuning)",
        "generic recipe (EfficientNet-Lite1)",
        "generic recipe (EfficientNet-Lite2)",
    ]
    assert any("graphite" in r and "mobilenet_v2 not in the space" in r for r in s.dropped)


def test_no_backbone_left_is_a_clear_error():
    with pytest.raises(ConfigError, match="no backbone in the search space has resolvable pretrained weights"):
        load_space(backbones=["resnet34"], weights_check=lambda b: (False, "not in TORCH_HOME"))


def test_real_weights_check_keeps_only_offline_backbones(tmp_path, monkeypatch):
    """With the trainer's real resolver and an empty TORCH_HOME, only the pip-installed Lite weights resolve."""
    from trainer.backbones import weights_available

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    s = load_space(weights_check=weights_available)
    assert set(s.backbones) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    with pytest.raises(ConfigError, match="resnet34"):
        load_space(backbones=["resnet34"], weights_check=weights_available)


def test_seed_freeze_counts_become_fractions(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text(
        "params:\n  backbone: {type: categorical, key: model.backbone, choices: [efficientnet_lite0]}\n"
        "  freeze: {type: float, key: model.freeze, low: 0.0, high: 1.0}\n"
        "seeds:\n  - name: counted\n    params: {backbone: efficientnet_lite0, freeze: 50}\n"
    )
    s = load_space(y, layer_count=lambda b: 200)
    assert s.seeds[0]["params"]["freeze"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "text,match",
    [
        ("params:\n  x: {type: weird, key: a}\n", "type must be one of"),
        ("params:\n  x: {type: float, key: a, low: 2, high: 1}\n", "need low < high"),
        ("params:\n  x: {type: float, key: a, low: 0, high: 1, log: true}\n", "log scale needs low > 0"),
        ("params:\n  x: {type: categorical, key: a, choices: []}\n", "non-empty 'choices'"),
        ("params:\n  x: {type: float, key: a, hihg: 1}\n", "unknown field"),
        ("params:\n  x: {type: float, key: a, when: {y: [1]}}\n", "depends on unknown parameter"),
        ("parms: {}\n", "unknown top-level key"),
        ("params: [\n", "not valid YAML"),
        ("params:\n  x: {type: categorical, choices: [a, b], sets: {a: {}}}\n", "one entry per choice"),
        ("params:\n  x: {type: categorical, key: k, choices: [a], sets: {a: {}}}\n", "exactly one of 'key'"),
        # the document's shape (tuner.space.SpaceDoc / ParamSpec): the parameter, the field and what is allowed
        ("params:\n  x: {type: float, key: a, low: abc}\n", r"parameter 'x': 'low' must be a number, got 'abc'"),
        ("params:\n  x: {type: categorical, key: a, choices: abc}\n", r"'x': 'choices' must be a list"),
        ("params:\n  x: {type: categorical, choices: [a], sets: {a: 5}}\n", "'sets' must map each choice to a mapping"),
        ("params:\n  x: {type: float, key: a, log: maybe}\n", "'log' must be true or false"),
        ("params:\n  x: {type: float}\n", r"parameter 'x' needs 'type' and 'key' \(or 'sets'\)"),
        ("params:\n  x: [1, 2]\n", "parameter 'x' must be a mapping"),
        ("params: [1]\n", "'params' must map parameter names to their specs"),
        (
            "seeds:\n  - {name: a, parms: {}}\n",
            r"seed configuration 1: unknown field\(s\) \['parms'\]; allowed: \['name', 'params'\]",
        ),
    ],
)
def test_invalid_space_files(tmp_path, text, match):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_space(y)


def test_missing_space_file():
    with pytest.raises(ConfigError, match="cannot read search space"):
        load_space(Path(DEFAULT_SPACE).with_name("nope.yaml"))


def test_cli_stops_with_a_clear_error_when_no_backbone_has_weights(tmp_path):
    """`python -m tuner` restricted to resnet34 without weights in TORCH_HOME: exit 2, the reason, no Ray."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCH_HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuner",
            "--data",
            "textures",
            "--backbones",
            "resnet34",
            "--out",
            str(tmp_path / "out"),
            "--storage",
            f"sqlite:///{tmp_path}/o.db",
        ],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no backbone in the search space has resolvable pretrained weights" in p.stderr
    assert "resnet34" in p.stderr
    assert "using a local Ray" not in p.stdout


def test_tune_options_validation():
    from tuner.options import TuneOptions

    for bad, match in [
        ({"trials": -1}, "trials must be an integer >= 0"),
        ({"trials": 0, "time_budget_s": 0}, "give a time budget"),
        ({"refit_share": 0.95}, "refit_share must be in"),
        ({"placement_strategy": "EVERYWHERE"}, "placement_strategy must be one of"),
        ({"metric": "accuracy"}, "metric must be one of"),
        ({"storage": "optuna.db"}, "storage must be an RDB URL"),
        ({"img": 8}, "img must be 0"),
        ({"resources_per_worker": {"slot": -1}}, "resources_per_worker"),
    ]:
        with pytest.raises(ConfigError, match=match):
            TuneOptions(out="/tmp/edgetune-opts-test", **bad)


def test_missing_weights_summarised_in_one_line_detail_on_verbose():
    s = load_space(weights_check=_only_lite, layer_count=lambda b: 100)
    assert set(s.missing_weights) == {"mobilenet_v2", "resnet34", "resnext50_32x4d"}
    quiet = s.dropped_report()
    summary = [x for x in quiet if x.startswith("backbones left out")]
    assert len(summary) == 1 and "mobilenet_v2, resnet34, resnext50_32x4d" in summary[0]
    assert "EDGETUNE_WEIGHTS_DIR" in summary[0] and "--verbose" in summary[0]
    assert not any(x.startswith("backbone ") for x in quiet)  # no per-backbone detail lines by default
    assert any("seed configuration" in x for x in quiet)  # other reasons still printed
    for loud in (s.dropped_report(verbose=True), s.dropped_report(explicit=True)):
        assert any("backbone resnet34 left out: no weights file found" in x for x in loud)
        assert not any(x.startswith("backbones left out") for x in loud)


def test_makefile_args_is_the_one_name_set_kept_for_train():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    for target in ("train", "tune", "export", "serve", "client"):
        body = re.search(rf"^{target}: .*?\n((?:\t.*\n)+)", text, re.M)
        assert body, target
        recipe = body.group(1)
        for var in re.findall(r"\$\((\w+_CMD)\)", recipe):  # a command shown masked, then run (Makefile `show`)
            recipe += re.search(rf"^{var} = ((?:.*\\\n)*.*)$", text, re.M).group(1)
        assert "$(ARGS)" in recipe, target
    train = re.search(r"^train: .*?\n((?:\t.*\n)+)", text, re.M)
    assert train and "$(SET)" in train.group(1)


def test_ema_decay_is_a_searched_parameter_of_the_default_space():
    """CONTRIBUTING.md's worked example: a parameter added to default_space.yaml alone is searched, maps onto its
    TrainConfig key in a trial's config, and the seed recipes keep the measured value."""
    from tuner.space import build_trial_config

    s = load_space(layer_count=lambda b: 100)
    prm = s.params["ema_decay"]
    assert prm.key == "optim.ema_decay" and set(prm.choices) == {0.99, 0.999}
    assert s.to_overrides({"ema_decay": 0.999}) == {"optim.ema_decay": 0.999}
    cfg = build_trial_config(TrainConfig(), s.to_overrides({"backbone": "efficientnet_lite0", "ema_decay": 0.999}))
    assert cfg.optim.ema_decay == 0.999
    assert all(x["params"]["ema_decay"] == 0.99 for x in s.seeds if x["name"].startswith("generic recipe"))


def test_a_given_ema_decay_fixes_the_searched_one():
    """--ema-decay other than the default is not overridden by the space (0 turns weight averaging off)."""
    from tuner.options import DEFAULT_EMA_DECAY, TuneOptions
    from tuner.run import fixed_params

    assert fixed_params(TuneOptions()) is None
    assert fixed_params(TuneOptions(ema_decay=DEFAULT_EMA_DECAY)) is None
    assert fixed_params(TuneOptions(ema_decay=0.0, img=96)) == {"ema_decay": 0.0, "img": 96}
    s = load_space(layer_count=lambda b: 100, fixed=fixed_params(TuneOptions(ema_decay=0.0)))
    assert "ema_decay" not in s.params and all("ema_decay" not in x["params"] for x in s.seeds)
