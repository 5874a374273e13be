"""Device in the loop (issue 13), the parts without a Ray cluster: the timing side's imports, architecture
signatures, target names and protocol, Pareto points and rejection, timing an untrained architecture, and the
latency cache in a real SQLite storage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from edgetune.errors import ConfigError, EdgetuneError

ROOT = Path(__file__).resolve().parents[1]


def test_timing_side_imports_no_torch_or_trainer():
    """What an edge node runs (the timing task and its module) needs edgetune[serve] + Ray, not torch/trainer."""
    code = (
        "import sys, edge_server.agent.timing, edge_server.agent.node, tuner.device; "
        "bad = [m for m in ('torch', 'trainer', 'torchvision') if m in sys.modules]; print(bad); "
        "sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_signature_key_is_stable_and_ignores_training_settings():
    from trainer.config import TrainConfig
    from tuner.device import ArchSignature, signature_for

    a = TrainConfig().replace(
        {"model.backbone": "efficientnet_lite0", "model.img_size": 96, "model.dropout": 0.1, "optim.lr": 0.01}
    )
    b = a.replace({"model.dropout": 0.3, "optim.lr": 0.001, "model.freeze": 0.5})
    c = a.replace({"model.img_size": 128})
    sa, sb, sc = (signature_for(x, 3) for x in (a, b, c))
    assert sa == sb and sa.key == sb.key  # weights/training settings do not change latency
    assert sa.key != sc.key and sa.input_size == (96, 96)
    assert ArchSignature.from_dict(json.loads(json.dumps(sa.to_dict()))) == sa
    assert sa.key != signature_for(a, 3, precision="fp16").key != signature_for(a, 4).key
    assert sa.label == "efficientnet_lite0/linear/96x96/fp32/b1"


def test_target_name_and_protocol_are_validated():
    from edgetune.device import TimingProtocol
    from tuner.device import target_resource
    from tuner.options import TuneOptions

    assert target_resource("jetson-orin.1") == "edge_target:jetson-orin.1"
    for bad in ("", "a b", "x" * 65, "-x", "a:b"):
        with pytest.raises(ConfigError, match="target must be"):
            target_resource(bad)
    with pytest.raises(ConfigError, match="timing runs must be an integer in"):
        TimingProtocol(runs=1)
    with pytest.raises(ConfigError, match="target must be"):
        TuneOptions(trials=1, target="no spaces please")
    assert TuneOptions(trials=1, target="sim").multi_objective  # the target's latency is the second objective


def test_pareto_points_and_rejection():
    from tuner.device import rejection
    from tuner.latency_report import pareto_points

    pts = [(0.9, 10.0), (0.8, 5.0), (0.85, 12.0), (0.9, 11.0), (0.7, 5.0)]
    assert pareto_points(pts, "max") == [0, 1]
    assert pareto_points([(0.5, 3.0), (0.4, 2.0)], "min") == [1]
    m = {"latency_ms": 7.5, "latency_signature": "x/linear/64x64/fp32/b1"}
    assert "p50 7.50 ms > --max-latency-ms 5 ms" in (rejection(m, 5.0) or "")
    assert rejection(m, 8.0) is None and rejection(m, 0.0) is None and rejection({}, 1.0) is None


def test_time_bundle_of_an_untrained_architecture(tmp_path):
    """The timing task's body on this machine: a real ONNX export of Lite0, timed with the server's runner."""
    from edge_server.agent.timing import time_bundle, time_bundle_files
    from edgetune.device import TimingProtocol
    from trainer.config import ModelConfig
    from trainer.export import bundle_files, write_architecture_bundle
    from trainer.model import create_model, preprocess_spec_for

    cfg = ModelConfig(backbone="efficientnet_lite0", weights="none", img_size=64)
    d = write_architecture_bundle(
        create_model(cfg, 3), preprocess_spec_for(cfg), 3, tmp_path / "arch", "efficientnet_lite0"
    )
    rec = time_bundle(d, protocol=TimingProtocol(warmup=2, runs=10))
    assert 0 < rec["min_ms"] <= rec["p50_ms"] <= rec["p90_ms"] <= rec["max_ms"]
    assert rec["protocol"] == {"warmup": 2, "runs": 10, "batch": 1, "threads": 1}
    assert rec["device"]["backend"] == "onnxruntime" and rec["device"]["cpu"] and rec["device"]["onnxruntime_version"]
    again = time_bundle_files(bundle_files(d), protocol={"warmup": 1, "runs": 5})
    assert again["onnx_sha256"] == rec["onnx_sha256"]
    with pytest.raises(EdgetuneError, match="outside the bundle"):
        time_bundle_files({"../evil.onnx": b"x"})
    with pytest.raises(ConfigError, match="fp32 and int8"):
        time_bundle(d, precision="fp16", backend="onnxruntime")


def test_latency_cache_is_shared_across_instances_and_studies(tmp_path):
    from trainer.config import TrainConfig
    from tuner.device import CACHE_STUDY, LatencyCache, signature_for

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    sig = signature_for(TrainConfig().replace({"model.img_size": 64}), 3)
    LatencyCache(url).put("sim", sig, {"p50_ms": 2.5, "p90_ms": 3.0, "node_id": "n1"})
    other = LatencyCache(url)  # e.g. a later study in the same storage
    assert other.get("sim", sig)["p50_ms"] == 2.5
    assert other.get("jetson", sig) is None  # keyed by target too
    [rec] = other.records("sim")
    assert rec["signature_key"] == sig.key and rec["target"] == "sim"
    assert CACHE_STUDY in [s.study_name for s in optuna.get_all_study_summaries(url)]
