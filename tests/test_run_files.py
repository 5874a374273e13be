"""One file for a run's options, for train and serve as for tune (tests/test_tuner_config_file.py): ``--print-config``
prints the effective options, ``--config`` reads that back to the same options (byte-equal when printed again),
flags given with it override it, and a bad file is refused naming what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_server.__main__ import main as serve_main
from trainer.__main__ import main as train_main


def _printed(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


# -- python -m trainer ------------------------------------------------------------------------------------------------
def test_train_print_config_round_trips(tmp_path, capsys):
    first = _printed(
        train_main,
        [
            "--data",
            "textures",
            "--epochs",
            "2",
            "--set",
            "optim.lr=0.002",
            "--repeats",
            "3",
            "--out",
            str(tmp_path / "run"),
            "--print-config",
        ],
        capsys,
    )
    data = yaml.safe_load(first)
    assert data["epochs"] == 2 and data["optim"]["lr"] == 0.002 and data["data"]["dataset"] == "textures"
    assert data["out"] == str(tmp_path / "run") and data["run"] == {"repeats": 3}
    (tmp_path / "run.yaml").write_text(first)
    assert _printed(train_main, ["--config", str(tmp_path / "run.yaml"), "--print-config"], capsys) == first


def test_train_flags_override_the_run_file(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(_printed(train_main, ["--data", "textures", "--print-config"], capsys))
    data = yaml.safe_load(
        _printed(
            train_main,
            [
                "--config",
                str(tmp_path / "run.yaml"),
                "--epochs",
                "5",
                "--repeats",
                "2",
                "--out",
                "elsewhere",
                "--print-config",
            ],
            capsys,
        )
    )
    assert data["epochs"] == 5 and data["run"] == {"repeats": 2} and data["out"] == "elsewhere"


def test_train_default_out_is_resolved_and_configs_still_read(capsys):
    graphite = Path(__file__).resolve().parents[1] / "configs" / "graphite.yaml"
    data = yaml.safe_load(_printed(train_main, ["--config", str(graphite), "--print-config"], capsys))
    assert data["model"]["backbone"] == "mobilenet_v2" and data["out"] == "runs/train/textures-mobilenet_v2"


@pytest.mark.parametrize(
    "text, words",
    [
        ("run: {repeats: 2, workers: 3}\n", ["run: section may set only repeats"]),
        ("run: {repeats: two}\n", ["'repeats' must be an integer"]),
        ("optim: {lrr: 0.1}\n", ["lrr"]),
    ],
)
def test_train_bad_run_file_is_refused(tmp_path, capsys, text, words):
    (tmp_path / "bad.yaml").write_text(text)
    assert train_main(["--config", str(tmp_path / "bad.yaml"), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


# -- python -m edge_server --------------------------------------------------------------------------------------------
def test_serve_print_config_round_trips(tmp_path, capsys):
    first = _printed(
        serve_main,
        [
            "--bundle",
            str(tmp_path / "b"),
            "--port",
            "6001",
            "--max-batch",
            "4",
            "--profile",
            "jetson",
            "--watch",
            "--print-config",
        ],
        capsys,
    )
    data = yaml.safe_load(first)
    assert data["bundle"] == str(tmp_path / "b") and data["port"] == 6001 and data["max_batch"] == 4
    assert data["profile"] == "jetson" and data["watch"] is True and data["host"] == "127.0.0.1"
    (tmp_path / "serve.yaml").write_text(first)
    # --bundle is required on the command line, but the file gives it
    assert _printed(serve_main, ["--config", str(tmp_path / "serve.yaml"), "--print-config"], capsys) == first
    over = yaml.safe_load(
        _printed(serve_main, ["--config", str(tmp_path / "serve.yaml"), "--port", "6002", "--print-config"], capsys)
    )
    assert over == {**data, "port": 6002}


def test_serve_never_prints_or_reads_a_token(tmp_path, capsys):
    out = _printed(serve_main, ["--bundle", "b", "--token", "s3cr3t-token", "--print-config"], capsys)
    assert "s3cr3t" not in out and "token:" not in out.replace("token_file:", "").replace("admin_token_file:", "")
    (tmp_path / "t.yaml").write_text("bundle: b\ntoken: s3cr3t-token\n")
    assert serve_main(["--config", str(tmp_path / "t.yaml"), "--print-config"]) == 2
    assert "--token-file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, words",
    [
        ("bundle: b\nprot: 1\n", ["unknown key(s) ['prot']", "allowed: bundle, host, port"]),
        ("bundle: b\nport: fast\n", ["'port' must be an integer"]),
        ("bundle: b\nbackend: cuda\n", ["'backend' must be one of"]),
        ("bundle: b\nwatch: 1\n", ["'watch' must be true or false"]),
        ("- bundle\n", ["must be a mapping"]),
    ],
)
def test_serve_bad_run_file_is_refused(tmp_path, capsys, text, words):
    (tmp_path / "bad.yaml").write_text(text)
    assert serve_main(["--config", str(tmp_path / "bad.yaml"), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
