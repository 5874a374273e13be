"""``python -m trainer``, ``python -m trainer.export`` and ``python -m edge_server.engine`` derive their flags from
option dataclasses (#12 "Configs"), like ``python -m tuner`` (tests/test_tuner_cli.py): every field has its flag
with the name of before (prefix matching off here), the CLI defaults are the dataclass defaults, --help lists
every option, and bad values fail as before."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional  # Optional: a hint dataclass_cli must read too

import pytest

from edge_server.engine import build as eng
from edge_server.engine.cache import BuildOptions
from edgetune.dataclass_cli import field_values
from edgetune.errors import ConfigError
from trainer import __main__ as train_cli
from trainer import export as export_cli

#: field -> (its flag and a value, the field's value then). The flag names are the CLIs' contract (the Makefile's
#: make train / export / engine, the README, tests/contracts): a field added to an options class needs a row here.
TRAIN_FLAGS: dict[str, tuple[list[str], object]] = {
    "config": (["--config", "configs/graphite.yaml"], "configs/graphite.yaml"),
    "sets": (["--set", "optim.lr=2e-4", "--set", "loss.gamma=0.25"], ("optim.lr=2e-4", "loss.gamma=0.25")),
    "data": (["--data", "textures"], "textures"),
    "epochs": (["--epochs", "3"], 3),
    "backbone": (["--backbone", "resnet18"], "resnet18"),
    "workers": (["--workers", "2"], 2),
    "img": (["--img", "64"], 64),
    "init": (["--init", "runs/earlier"], "runs/earlier"),
    "seed": (["--seed", "5"], 5),
    "repeats": (["--repeats", "3"], 3),
    "strict": (["--strict"], True),
    "gpu": (["--gpu"], True),
    "out": (["--out", "runs/x"], "runs/x"),
    "list_backbones": (["--list-backbones"], True),
    "print_config": (["--print-config"], True),
}
EXPORT_FLAGS: dict[str, tuple[list[str], object]] = {
    "run": (["--run", "runs/a"], "runs/a"),
    "out": (["--out", "runs/b"], "runs/b"),
    "quantize": (["--quantize", "dynamic,,static"], ("dynamic", "static")),
    "tolerance": (["--tolerance", "0.05"], 0.05),
}
ENGINE_FLAGS: dict[str, tuple[list[str], object]] = {
    "precision": (["--precision", "int8"], "int8"),
    "max_batch": (["--max-batch", "16"], 16),
    "opt_batch": (["--opt-batch", "2"], 2),
    "workspace_mb": (["--workspace-mb", "512"], 512),
    "timing_cache": (["--timing-cache", "/tmp/t.cache"], Path("/tmp/t.cache")),
    "calib_batch": (["--calib-batch", "4"], 4),
    "min_agreement": (["--min-agreement", "0.9"], 0.9),
    "force": (["--force"], True),
}

#: CLI name -> (options class, its parser, the arguments every call needs, the table, the CLI-only flags).
CLIS: dict[str, tuple[type, Callable[[], argparse.ArgumentParser], list[str], dict[str, Any], list[str]]] = {
    "trainer": (train_cli.TrainOptions, train_cli.build_parser, [], TRAIN_FLAGS, []),
    "export": (export_cli.ExportOptions, export_cli.build_parser, ["--run", "r"], EXPORT_FLAGS, []),
    "engine": (BuildOptions, eng.build_parser, ["--bundle", "b"], ENGINE_FLAGS, ["--bundle", "--verbose"]),
}
CASES = [(cli, name) for cli, (_, _, _, table, _) in CLIS.items() for name in sorted(table)]


def _parse(cli: str, argv: list[str]) -> tuple[Any, argparse.Namespace]:
    cls, build, base, _, _ = CLIS[cli]
    parser = build()
    parser.allow_abbrev = False  # the exact flag names (a prefix of a flag would be accepted otherwise)
    args = parser.parse_args([*base, *argv])
    return cls(**field_values(args, cls)), args


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_the_table_covers_every_field(cli: str) -> None:
    cls, _, _, table, _ = CLIS[cli]
    assert set(table) == {f.name for f in dataclasses.fields(cls)}
    assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


@pytest.mark.parametrize(("cli", "name"), CASES)
def test_every_field_is_set_by_its_flag(cli: str, name: str) -> None:
    argv, want = CLIS[cli][3][name]
    opts, _ = _parse(cli, argv)
    assert getattr(opts, name) == want
    if name != "run":  # required: no default to differ from
        assert getattr(opts, name) != getattr(_parse(cli, [])[0], name)  # the flag changed it


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_cli_defaults_are_the_dataclass_defaults(cli: str) -> None:
    cls, _, _, _, _ = CLIS[cli]
    opts, _ = _parse(cli, [])
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            continue  # a required flag
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert getattr(opts, f.name) == default, f.name


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_help_lists_every_option(cli: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping inside a help text
    cls, build, _, table, extra = CLIS[cli]
    text = build().format_help()
    for argv, _ in table.values():
        assert re.search(rf"^  {argv[0]}\b(?!-)", text, re.M), argv[0]  # the line of that option
    for flag in extra:
        assert re.search(rf"^  {flag}\b(?!-)", text, re.M), flag
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help") and f.metadata["help"].split(";")[0] in text, f.name  # each with its help


def test_trainer_flags_set_their_config_keys_and_set_wins() -> None:
    argv = [a for argv, _ in TRAIN_FLAGS.values() for a in argv if argv[0] not in ("--config", "--set")]
    opts, _ = _parse("trainer", [*argv, "--set", "optim.lr=2e-4", "--set", "epochs=7"])
    assert opts.overrides() == {
        "data.dataset": "textures",
        "epochs": 7,
        "model.backbone": "resnet18",
        "workers": 2,
        "model.img_size": 64,
        "model.init": "runs/earlier",
        "seed": 5,
        "data.strict": True,
        "use_gpu": True,
        "optim.lr": 2e-4,
    }  # --set wins over --epochs
    assert _parse("trainer", [])[0].overrides() == {}  # nothing given: the YAML / TrainConfig defaults
    cfg = train_cli.config_from_args(
        _parse("trainer", ["--data", "textures", "--epochs", "2", "--img", "64", "--set", "optim.lr=2e-4"])[1]
    )
    assert (cfg.data.dataset, cfg.epochs, cfg.model.img_size, cfg.optim.lr) == ("textures", 2, 64, 2e-4)
    assert cfg.data.strict is False and cfg.use_gpu is False


def test_trainer_config_yaml_then_flags(tmp_path: Path) -> None:
    y = tmp_path / "run.yaml"
    y.write_text("epochs: 4\nseed: 3\n")
    cfg = train_cli.config_from_args(_parse("trainer", ["--config", str(y), "--seed", "9"])[1])
    assert (cfg.epochs, cfg.seed) == (4, 9)


def test_trainer_bad_overrides_are_config_errors_naming_the_rule() -> None:
    with pytest.raises(ConfigError, match="optim.lr must be in"):
        train_cli.config_from_args(_parse("trainer", ["--set", "optim.lr=-1"])[1])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        train_cli.config_from_args(_parse("trainer", ["--set", "optim.lr"])[1])


def test_export_bundle_dir_default() -> None:
    assert _parse("export", [])[0].bundle_dir == Path("r") / "bundle"
    assert _parse("export", ["--out", "b"])[0].bundle_dir == Path("b")


def test_engine_empty_timing_cache_is_none_and_opt_batch_is_bounded() -> None:
    opts, args = _parse("engine", ["--timing-cache", ""])
    assert opts.timing_cache is None and args.bundle == "b" and args.verbose is False  # "" is no cache
    assert opts == BuildOptions()
    with pytest.raises(ConfigError, match="opt batch must be an integer in 1..8"):
        _parse("engine", ["--opt-batch", "9"])


def test_bad_flag_values_say_what_is_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    for cli, argv, expect in (
        ("trainer", ["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
        ("export", ["--tolerance", "x"], "argument --tolerance: invalid float value: 'x'"),
        ("engine", ["--precision", "int4"], "invalid choice: 'int4' (choose from 'auto',"),
        ("engine", ["--max-batch", "1.5"], "argument --max-batch: invalid int value: '1.5'"),
    ):
        with pytest.raises(SystemExit):
            _parse(cli, argv)
        assert expect in capsys.readouterr().err
    for build, required in ((export_cli.build_parser, "--run"), (eng.build_parser, "--bundle")):
        with pytest.raises(SystemExit):
            build().parse_args([])
        assert f"the following arguments are required: {required}" in capsys.readouterr().err


def test_dataclass_cli_optional_and_required_fields() -> None:
    from edgetune.dataclass_cli import add_fields, opt

    @dataclasses.dataclass(frozen=True)
    class Opts:
        name: str = opt(help="required")
        a: int | None = opt(None, "an int or nothing")
        b: Optional[float] = opt(None, "a float or nothing")  # noqa: UP045 - the other spelling of the same hint
        c: Path | None = opt(None, "a path or nothing")

    p = argparse.ArgumentParser()
    add_fields(p, Opts)
    got = Opts(**field_values(p.parse_args(["--name", "n", "--a", "3", "--b", "0.5", "--c", "x"]), Opts))
    assert got == Opts("n", 3, 0.5, Path("x"))
    assert Opts(**field_values(p.parse_args(["--name", "n", "--c", ""]), Opts)) == Opts("n")

    @dataclasses.dataclass(frozen=True)
    class Bad:
        names: tuple[str, ...] = opt(help="required list")

    with pytest.raises(TypeError, match="Bad.names: a required flag needs"):
        add_fields(argparse.ArgumentParser(), Bad)
