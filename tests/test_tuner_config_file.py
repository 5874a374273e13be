"""``python -m tuner --print-config`` prints the effective options as YAML; ``--config`` reads such a file (or a
study's ``<out>/tune_options.yaml``) back: the same text, flags given with it override it, unknown keys refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import edgetune
from tuner.__main__ import main
from tuner.options import TuneOptions, load_options_file, options_yaml


def _print(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(["--print-config", *argv]) == 0
    return capsys.readouterr().out


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the derived storage makes runs/ here
    monkeypatch.delenv("EDGETUNE_STORAGE_PATH", raising=False)
    return tmp_path


def test_print_config_round_trips_byte_equal(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _print(capsys)
    (here / "run.yaml").write_text(first)
    assert _print(capsys, "--config", "run.yaml") == first
    # every field, the derived defaults resolved
    names = [line.split(":")[0] for line in first.splitlines() if line and not line.startswith(("-", " "))]
    assert names == [f.name for f in dataclasses.fields(TuneOptions)]
    assert "study: elpv-default\n" in first and f"storage: sqlite:///{here / 'runs' / 'optuna.db'}\n" in first


def test_flags_given_with_config_override_the_file(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (here / "run.yaml").write_text(
        "data: textures\nepochs: 7\ntrials: 2\nsets: [batch_size=8]\nbackbones: [mobilenet_v2]\n"
    )
    text = _print(capsys, "--config", "run.yaml", "--trials", "5", "--set", "optim.lr=0.01")
    (here / "printed.yaml").write_text(text)
    opts = TuneOptions(**load_options_file(here / "printed.yaml"))
    assert (opts.data, opts.epochs, opts.trials) == ("textures", 7, 5)  # the file's, and the flag's over it
    assert opts.sets == ("batch_size=8", "optim.lr=0.01") and opts.backbones == ("mobilenet_v2",)
    assert opts.study == "textures-default"  # derived from the file's data


@pytest.mark.parametrize(
    "text,match",
    [
        ("trails: 3\n", r"unknown key\(s\) \['trails'\]; allowed: data, study, trials"),
        ("trials: many\n", r"'trials' must be an integer, got 'many'"),
        ("backbones: mobilenet_v2\n", r"'backbones' must be a list of strings"),
        ("- data\n", r"must be a mapping of option names to values"),
        ("time_budget_s: 20\n", r"minimum is 90 s"),
    ],
)
def test_a_bad_config_file_is_refused_saying_what_is_allowed(
    here: Path, capsys: pytest.CaptureFixture[str], text: str, match: str
) -> None:
    import re

    (here / "run.yaml").write_text(text)
    assert main(["--config", "run.yaml", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_the_written_tune_options_yaml_reads_back_to_the_same_options(here: Path) -> None:
    opts = TuneOptions(
        data="textures",
        trials=3,
        epochs=2,
        backbones=("mobilenet_v2",),
        sets=("batch_size=8",),
        resources_per_worker={"slot": 1.0},
        env_vars={"A": "1"},
        target="sim",
        precisions=("fp32", "int8"),
    )
    text = options_yaml(opts)
    (here / "tune_options.yaml").write_text(text)
    again = TuneOptions(**load_options_file(here / "tune_options.yaml"))
    assert again == opts and options_yaml(again) == text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"python -m tuner {edgetune.__version__}"


def _clis() -> list[str]:
    """Every module of the product that builds a command line (an ``argparse.ArgumentParser`` with a ``prog``)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    found = []
    for pkg in ("edgetune", "trainer", "tuner", "edge_server", "edge_client", "fieldloop"):
        for path in sorted((root / pkg).rglob("*.py")):
            for n in ast.walk(ast.parse(path.read_text())):
                if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("ArgumentParser"):
                    if any(k.arg == "prog" for k in n.keywords):
                        found.append(".".join(path.relative_to(root).with_suffix("").parts))
                        break
    return found


def test_every_cli_is_found() -> None:
    assert {"tuner.__main__", "trainer.__main__", "edge_server.__main__", "tuner.report", "fieldloop.label"} <= set(
        _clis()
    )


@pytest.mark.parametrize("module", _clis())
def test_every_cli_answers_version(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--version`` everywhere (edgetune.dataclass_cli.add_version): the parser's own, or main()'s."""
    import importlib

    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        if hasattr(mod, "build_parser"):
            mod.build_parser().parse_args(["--version"])
        else:
            mod.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip().endswith(f" {edgetune.__version__}")
