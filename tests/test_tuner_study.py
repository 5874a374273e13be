"""A tiny study end to end (textures, 64 px, 2 epochs), a multi-objective one in the same storage,
then the outputs, the Optuna storage, `make report`, and optuna-dashboard on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import threading
import urllib.request

import optuna
import pytest

from tests.test_tuner_helpers import TINY_ARGS, run_tuner, write_space
from trainer.checkpoint import read_meta
from tuner.summary import read_summary

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1200)]

TRIAL_ATTRS = (
    "params",
    "size_mb",
    "train_seconds",
    "images_per_s",
    "val_macro_f1",
    "checkpoint_uri",
    "ray_trial_id",
    "node_id",
)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    storage = f"sqlite:///{tmp / 'optuna.db'}"
    space = write_space(tmp)
    common = [*TINY_ARGS, "--space", str(space), "--storage", storage, "--address", "local"]
    run_tuner(
        [
            *common,
            "--study",
            "single",
            "--trials",
            "4",
            "--epochs",
            "2",
            "--grace-period",
            "1",
            "--max-concurrent",
            "1",
            "--refit-warm",
            "--out",
            str(tmp / "single"),
        ],
        tmp / "single.log",
    )
    run_tuner(
        [
            *common,
            "--study",
            "multi",
            "--trials",
            "2",
            "--epochs",
            "1",
            "--multi-objective",
            "--max-latency-ms",
            "10000",
            "--out",
            str(tmp / "multi"),
        ],
        tmp / "multi.log",
    )
    return {"tmp": tmp, "storage": storage}


def test_study_states_and_user_attrs(studies):
    s = optuna.load_study(study_name="single", storage=studies["storage"])
    trials = s.get_trials()
    assert len(trials) == 4
    states = [t.state.name for t in trials]
    assert set(states) <= {"COMPLETE", "PRUNED"}, states
    assert "PRUNED" in states and "COMPLETE" in states
    # the hopeless-LR seed cannot beat the good probe at the first rung: ASHA stops it -> PRUNED
    assert trials[0].state.name == "COMPLETE" and trials[1].state.name == "PRUNED"
    for t in trials:
        missing = [k for k in TRIAL_ATTRS if k not in t.user_attrs]
        assert not missing, (t.number, missing)
        assert t.user_attrs["params"] > 1_000_000 and t.user_attrs["train_seconds"] > 0
        assert t.intermediate_values, f"trial {t.number} has no intermediate values"
        if t.state.name == "COMPLETE":
            assert max(t.intermediate_values) == 2 and t.value == t.intermediate_values[2]
        else:
            assert max(t.intermediate_values) < 2
    a = s.user_attrs
    assert a["dataset"] == "textures" and len(a["dataset_hash"]) >= 16
    assert a["split_seed"] == 0 and len(a["split_ratios"]) == 3
    assert a["budget"]["trials"] == 4 and a["budget"]["max_epochs"] == 2
    assert set(a["search_space"]) == {"backbone", "freeze", "lr", "head", "head_hidden"}
    assert a["edgetune_version"]


def test_outputs_written_and_best_checkpoint_loads(studies):
    from trainer.model import model_from_checkpoint
    from trainer.run import SUMMARY_KEYS

    out = studies["tmp"] / "single"
    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and rows[0]["state"] == "REFIT" and rows[0]["trial"].startswith("refit of #")
    assert {r["trial"] for r in rows[1:]} == {"0", "1", "2", "3"}
    assert (out / "leaderboard.md").read_text().count("\n") >= 6
    m = json.loads((out / "best" / "metrics.json").read_text())
    for k in (*SUMMARY_KEYS, "params"):
        assert k in m, k
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["test_images"] > 0
    summary = read_summary(out)
    assert summary.ray["mode"] == "local" and summary.refit is not None and summary.final is not None
    # --refit-warm: the final fit continued the best trial's own weights, not ImageNet's again
    assert summary.refit["warm_from"] == summary.refit["of_trial"] >= 0
    assert read_meta(out / "best")["weights_source"].startswith("init:")
    assert summary.final.test_accuracy == m["test_accuracy"]
    for png in ("optimization_history.png", "learning_curves.png", "confusion_matrix.png"):
        assert (out / png).stat().st_size > 1000, png
    model, meta = model_from_checkpoint(out / "best")
    assert meta["classes"] == ["brick", "grass", "gravel"]
    import torch

    with torch.no_grad():
        y = model(torch.zeros(1, 3, 64, 64))
    assert y.shape == (1, 3)


def test_multi_objective_pareto_front_and_latency_budget(studies):
    from tuner.finish import _candidates
    from tuner.report import leaderboard_rows

    s = optuna.load_study(study_name="multi", storage=studies["storage"])
    assert [d.name for d in s.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert all(t.state.name == "COMPLETE" and len(t.values) == 2 and t.values[1] > 0 for t in s.trials)
    front = {p["trial"] for p in read_summary(studies["tmp"] / "multi").pareto_front}
    assert front == {t.number for t in s.best_trials} and front
    rows = leaderboard_rows(s, "val_macro_f1")
    lat = sorted(r["latency_ms"] for r in rows)
    # a budget that only the fastest trials meet: only they are candidates, the most accurate of them first
    within = [r for r in rows if r["latency_ms"] <= lat[0]]
    picked = _candidates(rows, "val_macro_f1", lat[0])
    assert [r["trial"] for r in picked] == [r["trial"] for r in within]
    assert picked[0]["val_macro_f1"] == max(r["val_macro_f1"] for r in within)
    # a budget nobody meets falls back to every finished trial, the most accurate first
    fallback = _candidates(rows, "val_macro_f1", lat[0] / 10)
    assert len(fallback) == len(rows) and fallback[0]["val_macro_f1"] == max(r["val_macro_f1"] for r in rows)
    assert s.metric_names == ["val_macro_f1", "latency_ms"]  # optuna-dashboard labels its axes with these


def test_report_compares_two_studies(studies, capsys):
    from tuner.report import main

    out = studies["tmp"] / "report"
    assert main(["--studies", "single,multi", "--storage", studies["storage"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with open(out / "report.csv") as f:
        rows = {r["study"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"single", "multi"}
    assert rows["single"]["trials"] == "4" and rows["multi"]["trials"] == "2"
    assert rows["single"]["dataset"] == rows["multi"]["dataset"] == "textures"
    assert rows["single"]["dataset_hash"] == rows["multi"]["dataset_hash"]
    assert "single" in printed and "multi" in printed and (out / "report.md").is_file()
    with pytest.raises(SystemExit, match="no study 'nope'"):
        main(["--studies", "single,nope", "--storage", studies["storage"], "--out", str(out)])


def test_dashboard_serves_the_studies(studies):
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from tuner.dashboard import make_app

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):  # noqa: ANN002
            pass

    httpd = make_server("127.0.0.1", 0, make_app(studies["storage"]), handler_class=Quiet)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        port = httpd.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as r:
            body = json.loads(r.read())
        names = {s["study_name"] for s in body["study_summaries"]}
        assert {"single", "multi"} <= names
        sid = next(s["study_id"] for s in body["study_summaries"] if s["study_name"] == "single")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{sid}", timeout=30) as r:
            detail = json.loads(r.read())
        assert len(detail["trials"]) == 4
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=10)
    assert not t.is_alive()
