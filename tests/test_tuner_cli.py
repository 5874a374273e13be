"""``python -m tuner``'s flags are derived from tuner.options.TuneOptions (#12 "Configs"): every field has its flag, the
CLI defaults are the dataclass defaults, the flag names of before still work, and TuneOptions is frozen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgetune.dataclass_cli import field_values
from edgetune.errors import ConfigError
from tuner.__main__ import build_parser, tune_options
from tuner.options import TuneOptions

#: field -> (its flag and a value, the field's value then). The flag names are the CLI's contract: the ones of
#: before the CLI was derived from TuneOptions. A field added to TuneOptions needs a row here.
FLAGS: dict[str, tuple[list[str], object]] = {
    "data": (["--data", "textures"], "textures"),
    "study": (["--study", "s1"], "s1"),
    "trials": (["--trials", "7"], 7),
    "epochs": (["--epochs", "9"], 9),
    "time_budget_s": (["--time-budget", "120.5"], 120.5),
    "storage": (["--storage", "sqlite:///{tmp}/x.db"], "sqlite:///{tmp}/x.db"),
    "storage_path": (["--storage-path", "{tmp}/ray-store"], "{tmp}/ray-store"),
    "space": (["--space", "my_space.yaml"], "my_space.yaml"),
    "backbones": (["--backbones", "resnet18,,mobilenetv3_small_100"], ("resnet18", "mobilenetv3_small_100")),
    "train_config": (["--train-config", "base.yaml"], "base.yaml"),  # --config: the tuner's own options file
    "sets": (["--set", "batch_size=8", "--set", "optim.lr=0.01"], ("batch_size=8", "optim.lr=0.01")),
    "img": (["--img", "64"], 64),
    "max_images": (["--max-images", "40"], 40),
    "gpus_per_trial": (["--gpus-per-trial", "0.5"], 0.5),
    "workers_per_trial": (["--workers-per-trial", "2"], 2),
    "cpus_per_worker": (["--cpus-per-worker", "0.5"], 0.5),
    "resources_per_worker": (["--resources-per-worker", "slot=1,node=0.5"], {"slot": 1.0, "node": 0.5}),
    "placement_strategy": (["--placement-strategy", "STRICT_SPREAD"], "STRICT_SPREAD"),
    "max_concurrent": (["--max-concurrent", "3"], 3),
    "grace_period": (["--grace-period", "1"], 1),
    "reduction_factor": (["--reduction-factor", "3"], 3),
    "seed": (["--seed", "5"], 5),
    "out": (["--out", "{tmp}/other-out"], "{tmp}/other-out"),
    "resume": (["--resume"], True),
    "multi_objective": (["--multi-objective"], True),
    "max_latency_ms": (["--max-latency-ms", "20"], 20.0),
    "target": (["--target", "sim"], "sim"),
    "int8_tolerance": (["--int8-tolerance", "0.05"], 0.05),
    "precisions": (["--precisions", "fp32,int8", "--target", "sim"], ("fp32", "int8")),
    "timing_warmup": (["--timing-warmup", "2"], 2),
    "timing_runs": (["--timing-runs", "5"], 5),
    "timing_timeout_s": (["--timing-timeout", "30"], 30.0),
    "timing_backend": (["--timing-backend", "onnxruntime"], "onnxruntime"),
    "max_failures": (["--max-failures", "0"], 0),
    "address": (["--address", "local"], "local"),
    "export": (["--no-export"], False),
    "metric": (["--metric", "val_acc"], "val_acc"),
    "refit": (["--no-refit"], False),
    "refit_share": (["--refit-share", "0.3"], 0.3),
    "refit_max_epochs": (["--refit-max-epochs", "6"], 6),
    "refit_warm": (["--refit-warm"], True),
    "probe_share": (["--probe-share", "0.2"], 0.2),
    "ema_decay": (["--ema-decay", "0.5"], 0.5),
    "ensemble": (["--ensemble", "off"], "off"),
    "env_vars": (["--env-vars", "A=1,B=x"], {"A": "1", "B": "x"}),
    "verbose": (["--verbose"], True),
}


def _opts(argv: list[str], tmp: Path) -> TuneOptions:
    parser = build_parser()
    parser.allow_abbrev = False  # the exact flag names (a prefix of a flag would be accepted otherwise)
    return tune_options(parser.parse_args(["--out", str(tmp / "out"), *argv]))


def test_the_table_covers_every_field() -> None:
    assert set(FLAGS) == {f.name for f in dataclasses.fields(TuneOptions)}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_every_field_is_set_by_its_flag(name: str, tmp_path: Path) -> None:
    argv, want = FLAGS[name]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if isinstance(want, str):
        want = want.replace("{tmp}", str(tmp_path))
    opts = _opts(argv, tmp_path)
    assert getattr(opts, name) == want
    assert getattr(opts, name) != getattr(_opts([], tmp_path), name)  # the flag changed it


def test_cli_defaults_are_the_dataclass_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default storage makes runs/ here
    monkeypatch.delenv("EDGETUNE_STORAGE_PATH", raising=False)
    args = build_parser().parse_args([])
    given = field_values(args, TuneOptions)  # what TuneOptions gets from the CLI with no flags
    for f in dataclasses.fields(TuneOptions):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert given[f.name] == default, f.name
    assert args.cluster_config == "cluster.yaml"  # the one CLI-only option
    assert tune_options(args) == TuneOptions()


def test_help_lists_every_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping inside a help text
    text = build_parser().format_help()
    for argv, _ in FLAGS.values():
        assert argv[0] in text, argv[0]
    assert "--cluster-config" in text
    assert "extra custom Ray resources per worker" in text  # help from the field's metadata
    assert "export the best trial's own checkpoint instead of a longer refit" in text  # --no-refit's own help


def test_bad_flag_values_say_what_is_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, expect in (
        (["--resources-per-worker", "slot"], "expected NAME=AMOUNT[,NAME=AMOUNT], got 'slot'"),
        (["--metric", "f2"], "invalid choice: 'f2' (choose from 'val_macro_f1'"),
        (["--placement-strategy", "x"], "(choose from 'PACK', 'SPREAD'"),
        (["--timing-backend", "x"], "(choose from 'auto', 'tensorrt', 'onnxruntime')"),
        (["--trials", "many"], "argument --trials: invalid int value: 'many'"),
    ):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        assert expect in capsys.readouterr().err


def test_options_are_validated_with_the_same_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="img must be 0"):
        _opts(["--img", "8"], tmp_path)


def test_options_are_frozen_and_derived_once(tmp_path: Path) -> None:
    opts = TuneOptions(trials=1, epochs=2, grace_period=5, target="sim", out=str(tmp_path / "o"))
    assert (opts.grace_period, opts.multi_objective, opts.study) == (2, True, "elpv-default")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.study = "other"  # type: ignore[misc]
    again = dataclasses.replace(opts, seed=3)
    assert again.seed == 3 and again.storage == opts.storage and opts.seed == 0


def test_mutable_arguments_are_copied(tmp_path: Path) -> None:
    res = {"slot": 1.0}
    opts = TuneOptions(resources_per_worker=res, backbones=["resnet18"], out=str(tmp_path))  # type: ignore[arg-type]
    res["slot"] = 2.0
    assert opts.resources_per_worker == {"slot": 1.0} and opts.backbones == ("resnet18",)
