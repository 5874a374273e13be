"""Device in the loop (issue 13) on a real Ray cluster: a head and an edge node carrying ``edge_target:sim``
(ONNX Runtime backend), real ONNX exports of real architectures, real SQLite storage, real studies."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from edgetune.errors import EdgetuneError
from tuner.device import CACHE_STUDY

ROOT = Path(__file__).resolve().parents[1]


# --- a real Ray cluster: head + edge node ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    edge = c.add_node(num_cpus=0, resources={"edge_target:sim": 1})
    ray.init(address=c.address, logging_level="ERROR")
    c.wait_for_nodes()
    try:
        yield {"cluster": c, "edge": edge}
    finally:
        ray.shutdown()
        c.shutdown()


def _edge_id(cluster) -> str:
    return cluster["edge"].node_id


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_require_target_finds_the_edge_node_or_says_how_to_join(cluster):
    from tuner.device import live_targets, require_target

    assert require_target("sim") == [_edge_id(cluster)]
    assert live_targets() == {"sim": [_edge_id(cluster)]}
    with pytest.raises(EdgetuneError) as e:
        require_target("jetson")
    msg = str(e.value)
    assert "edge_target:jetson" in msg and "make edge-node HEAD=<head host>:<port> TARGET=jetson" in msg
    assert "live targets: ['sim']" in msg


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_study_with_a_target_without_live_node_fails_at_start(cluster, tmp_path):
    from tuner.run import run_study

    opts = _opts(tmp_path, "nodevice", target="jetson")
    t0 = time.time()
    with pytest.raises(
        EdgetuneError, match=r"edge_target:jetson.*make edge-node HEAD=<head host>:<port> TARGET=jetson"
    ):
        run_study(opts)
    assert time.time() - t0 < 60
    assert not (Path(opts.out) / "split.json").exists()  # failed before the data was prepared
    assert "nodevice" not in [s.study_name for s in optuna.get_all_study_summaries(opts.storage)]


def _service(url: str, study: str, warmup: int, runs: int):
    """A latency service for target sim (ONNX Runtime) on storage ``url``, and the LatencySetup trials get."""
    from tuner import device
    from tuner.latency_service import start_service

    device.LatencyCache(url)
    svc = start_service(
        study, url, "sim", {"warmup": warmup, "runs": runs, "batch": 1, "threads": 1}, "onnxruntime", 120.0
    )
    return svc, device.LatencySetup(study=study, target="sim", service=svc)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_service_times_each_architecture_once_on_the_edge_node(cluster, tmp_path):
    """Two trials asking for the same new architecture at once: one timing, on the edge node; then cache hits."""
    import ray

    from trainer.config import TrainConfig
    from tuner import device

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    svc, setup = _service(url, "svc", warmup=1, runs=5)
    cfg = TrainConfig().replace({"model.backbone": "efficientnet_lite0", "model.img_size": 64})

    @ray.remote(num_cpus=1)
    def trial(c: dict) -> dict:
        from trainer.config import TrainConfig as TC

        a = device.get_latency(setup, TC.from_dict(c), 3, "fp32")
        return {"status": a["status"], "node": a["record"]["node_id"], "p50": a["record"]["p50_ms"]}

    both = ray.get([trial.remote(cfg.to_dict()), trial.remote(cfg.to_dict())])
    assert sorted(x["status"] for x in both) == ["hit", "timed"], both  # one timed it, the other waited for it
    assert {x["node"] for x in both} == {_edge_id(cluster)}
    assert both[0]["p50"] == both[1]["p50"] > 0
    third = device.get_latency(setup, cfg, 3, "fp32")
    assert third["status"] == "hit"
    stats = ray.get(svc.get_stats.remote())
    # timed once; the second trial waited for it (or, if it started after, found it): a hit either way
    assert stats["timed"] == 1 and stats["hits"] == 2 and stats["waited"] <= 1, stats
    # a new service (the next study) finds it in the storage: no timing
    svc2, setup2 = _service(url, "svc2", warmup=1, runs=5)
    again = device.get_latency(setup2, cfg, 3, "fp32")
    assert again["status"] == "hit" and ray.get(svc2.get_stats.remote())["timed"] == 0
    # another protocol (--timing-runs) does not reuse the record: re-timed
    svc3, setup3 = _service(url, "svc3", warmup=1, runs=7)
    third = device.get_latency(setup3, cfg, 3, "fp32")
    assert third["status"] == "timed" and third["record"]["protocol"]["runs"] == 7
    assert ray.get(svc3.get_stats.remote())["stale"] == 1
    # a claimer that cannot export releases its claim: the next caller claims it at once, no wait
    other = device.signature_for(cfg.replace({"model.img_size": 72}), 3).to_dict()
    first = ray.get(svc.lookup.remote(other))
    assert first["status"] == "claim"
    ray.get(svc.release.remote(other, first["token"]))
    second = ray.get(svc.lookup.remote(other), timeout=10)
    assert second["status"] == "claim" and second["token"] != first["token"]
    for s in (svc, svc2, svc3):
        ray.kill(s)


DEVICE_SPACE = """\
params:
  backbone: {type: categorical, key: model.backbone, choices: [efficientnet_lite0]}
  img: {type: categorical, key: model.img_size, choices: [64, 224]}
  freeze: {type: categorical, key: model.freeze, choices: [1.0]}
  lr: {type: categorical, key: optim.lr, choices: [3.0e-3]}
seeds:
  - name: "slow first, timed in its trial and rejected before its first epoch"
    params: {backbone: efficientnet_lite0, img: 224, freeze: 1.0, lr: 3.0e-3}
  - name: fast
    params: {backbone: efficientnet_lite0, img: 64, freeze: 1.0, lr: 3.0e-3}
  - name: "slow again, already known: rejected before it starts"
    params: {backbone: efficientnet_lite0, img: 224, freeze: 1.0, lr: 3.0e-3}
"""


#: the rejection test's space: the slow architecture is far slower (1024 px, ~250x the FLOPs of 64 px), so a loaded
#: machine cannot blur which side of the constraint each one falls on (see that test)
REJECT_SPACE = DEVICE_SPACE.replace("[64, 224]", "[64, 1024]").replace("img: 224", "img: 1024")


def _opts(tmp: Path, study: str, space_text: str = DEVICE_SPACE, **kw):
    from tuner.options import TuneOptions

    space = tmp / "space.yaml"
    space.write_text(space_text)
    base = dict(
        data="textures",
        study=study,
        trials=3,
        epochs=1,
        time_budget_s=0,
        max_images=60,
        sets=("batch_size=16", "threads=1"),
        storage=f"sqlite:///{tmp / 'optuna.db'}",
        space=str(space),
        out=str(tmp / study),
        refit=False,
        export=False,
        max_concurrent=1,
        timing_warmup=2,
        timing_runs=15,
        timing_backend="onnxruntime",
        precisions=("fp32",),
    )
    base.update(kw)
    return TuneOptions(**base)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)  # a hang guard: 22-30 s quiet, 469-680 s in loaded runs (Ray workers at nice 15)
def test_study_on_target_times_on_edge_node_rejects_too_slow_and_writes_pareto(cluster, tmp_path):
    from trainer.config import TrainConfig
    from tuner import device
    from tuner.run import run_study

    # the constraint sits between the two architectures' latencies, arranged so that a loaded machine cannot move
    # either across it. The fast one (64 px) is timed here on the edge node into the study's own storage, and the study
    # reads that record from the storage's timing cache (same signature, protocol and backend): its median is fixed
    # before the study starts, and the limit is twice it. The slow one (1024 px) is timed in its trial, and load only
    # adds time to a run: its median cannot be below its compute time (~100 ms on this CPU, quiet), far above twice
    # the fast one's median even loaded (issue 20 saw a 64 px median of 26 ms beside the CPU hogs, against 0.5 ms
    # quiet; a limit taken from one timing and compared with another's median failed then).
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    svc, setup = _service(storage, "probe", warmup=2, runs=15)
    small = {"model.backbone": "efficientnet_lite0", "model.img_size": 64}
    fast_rec = device.get_latency(setup, TrainConfig().replace(small), 3, "fp32")["record"]
    assert fast_rec["node_id"] == _edge_id(cluster) and fast_rec["kind"] == "device", fast_rec
    limit = 2 * fast_rec["p50_ms"]

    opts = _opts(tmp_path, "dev", REJECT_SPACE, target="sim", max_latency_ms=limit, export=True, storage=storage)
    summary = run_study(opts)
    s = optuna.load_study(study_name="dev", storage=opts.storage)
    by_img: dict[int, list] = {}
    for t in s.trials:
        by_img.setdefault(t.params["img"], []).append(t)
    slow, fast = by_img[1024], by_img[64]
    assert len(slow) == 2 and len(fast) >= 1
    for t in slow:  # rejected before its first epoch, with the reason
        assert t.state.name == "PRUNED" and not t.intermediate_values, t
        assert "--max-latency-ms" in t.user_attrs["rejected_reason"]
        assert t.user_attrs["target_latency_ms"] > limit
    assert [("ray_trial_id" in t.user_attrs) for t in slow] == [True, False]  # in its trial; then before starting
    for t in fast:  # trained, latency measured on the edge node
        assert t.state.name == "COMPLETE" and t.intermediate_values
        assert 0 < t.user_attrs["target_latency_ms"] == fast_rec["p50_ms"] <= limit  # the record from the cache
        assert t.user_attrs["target_node"] == _edge_id(cluster)
        assert json.loads(t.user_attrs["target_device"])["backend"] == "onnxruntime"
    out = Path(opts.out)
    with open(out / "latency_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["input_size"] for r in rows) == ["1024x1024", "64x64"]  # one row per architecture
    assert all(r["node_id"] == _edge_id(cluster) and r["kind"] == "device" for r in rows)
    assert (out / "pareto.png").stat().st_size > 5000
    # the storage-wide table next to the SQLite file (every study of the storage; here the one)
    with open(tmp_path / "latency_table.csv") as f:
        shared = list(csv.DictReader(f))
    assert sorted(r["signature_key"] for r in shared) == sorted(r["signature_key"] for r in rows)
    assert summary.latency is not None and summary.bundle is not None
    assert summary.latency["storage_latency_table"] == str(tmp_path / "latency_table.csv")
    assert list(summary.latency["rejected_by_constraint"]) == [t.number for t in slow]
    with open(out / "leaderboard.csv") as f:
        lb = {r["trial"]: r for r in csv.DictReader(f)}
    assert all(lb[str(t.number)]["rejected"] for t in slow) and all(
        float(lb[str(t.number)]["target_latency_ms"]) > 0 for t in fast
    )
    from edgetune.bundle import load_bundle
    from tuner.report import compare_studies

    [row] = compare_studies(opts.storage, ["dev"])  # make report
    assert row["target"] == "sim" and row["best_target_latency_ms"] > 0 and row["rejected_by_latency"] == 2
    # hand-off: the bundle records the winner's latency on the target, and the bundle itself was timed there
    handoff = load_bundle(str(summary.bundle)).manifest.extra["target_latency"]
    assert handoff["target"] == "sim" and handoff["node_id"] == _edge_id(cluster) and handoff["p50_ms"] <= limit
    assert handoff["device"]["backend"] == "onnxruntime" and handoff["protocol"]["runs"] == 15
    assert summary.latency["winner"]["status"] == "timed" and summary.latency["winner"]["node_id"] == _edge_id(cluster)
    assert summary.latency["winner"]["onnx_sha256"] == load_bundle(str(summary.bundle)).sha256
    import ray

    ray.kill(svc)


def _timed_architectures(storage: str) -> int:
    """Timings the study's latency service has stored (one user attr per target and signature)."""
    try:
        return len(optuna.load_study(study_name=CACHE_STUDY, storage=storage).user_attrs)
    except KeyError:
        return 0


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_edge_node_dies_mid_study_study_finishes_nothing_lost(cluster, tmp_path):
    """The edge node goes away after the first trial: the next new architecture's trial waits, then is marked
    FAIL with the reason (not trained); the node comes back while the last trial waits for its timing, and that
    timing runs on it. No finished trial is lost. (The study runs as ``python -m tuner``: Ray's Cluster helper
    adds and removes nodes only from the main thread.)"""
    from tests.test_tuner_helpers import tuner_env

    c = cluster["cluster"]
    space = tmp_path / "space.yaml"
    space.write_text(
        DEVICE_SPACE.replace("choices: [64, 224]", "choices: [64, 72, 80]").split("seeds:")[0]
        + """seeds:
  - {name: a, params: {backbone: efficientnet_lite0, img: 64, freeze: 1.0, lr: 3.0e-3}}
  - {name: b, params: {backbone: efficientnet_lite0, img: 72, freeze: 1.0, lr: 3.0e-3}}
  - {name: c, params: {backbone: efficientnet_lite0, img: 80, freeze: 1.0, lr: 3.0e-3}}
"""
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [
        "--data",
        "textures",
        "--max-images",
        "60",
        "--set",
        "batch_size=16",
        "--set",
        "threads=1",
        "--no-export",
        "--no-refit",
        "--space",
        str(space),
        "--storage",
        storage,
        "--study",
        "dies",
        "--trials",
        "3",
        "--epochs",
        "1",
        "--max-concurrent",
        "1",
        "--out",
        str(tmp_path / "dies"),
        "--target",
        "sim",
        "--timing-backend",
        "onnxruntime",
        "--timing-runs",
        "10",
        "--timing-warmup",
        "2",
        "--timing-timeout",
        "40",
        "--precisions",
        "fp32",
        "--address",
        c.address,
    ]
    log = open(tmp_path / "tune.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuner", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=tuner_env()
    )
    new_edge = None
    try:
        deadline = time.time() + 800
        while proc.poll() is None and time.time() < deadline:
            try:
                trials = optuna.load_study(study_name="dies", storage=storage).trials
            except KeyError:
                trials = []
            done = [t for t in trials if t.state.is_finished()]
            if cluster["edge"] is not None and new_edge is None and _timed_architectures(storage) >= 1:
                # the edge node dies once it has timed the first trial's architecture: a state, not a race with
                # the second trial's timing request (trials run one at a time)
                c.remove_node(cluster["edge"])
                cluster["edge"] = None
            if len(done) == 2 and new_edge is None:
                time.sleep(3)  # the third trial is waiting for its timing now
                new_edge = c.add_node(num_cpus=0, resources={"edge_target:sim": 1})
                cluster["edge"] = new_edge
            time.sleep(0.5)
        assert proc.wait(timeout=60) == 0, (tmp_path / "tune.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    s = optuna.load_study(study_name="dies", storage=storage)
    t0, t1, t2 = s.trials
    assert t0.state.name == "COMPLETE" and t0.values[1] == t0.user_attrs["target_latency_ms"] > 0  # kept
    assert t1.state.name == "FAIL" and "no latency for the second objective" in t1.user_attrs["fail_reason"]
    assert "within 40 s" in t1.user_attrs["target_latency_status"] and not t1.intermediate_values  # not trained
    assert t2.state.name == "COMPLETE", t2.user_attrs
    assert new_edge is not None and t2.user_attrs["target_node"] == new_edge.node_id


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_int8_searched_on_target_timed_as_int8_and_handed_off(cluster, tmp_path):
    """``--precisions int8`` on the sim target (ONNX Runtime): the trial is timed on the edge node as its static
    INT8 variant, the table says int8, and the winner's bundle deploys what its export accepted, timed at that
    precision on the edge node."""
    from edgetune.bundle import load_bundle
    from tuner.run import run_study

    opts = _opts(tmp_path, "q8", target="sim", trials=1, export=True, precisions=("int8",))
    summary = run_study(opts)
    [t] = optuna.load_study(study_name="q8", storage=opts.storage).trials
    assert t.params["precision"] == "int8" and list(t.distributions["precision"].choices) == ["int8"]
    assert t.user_attrs["latency_signature"].endswith("/int8/b1") and t.user_attrs["target_latency_ms"] > 0
    assert t.user_attrs["target_node"] == _edge_id(cluster)
    with open(Path(opts.out) / "latency_table.csv") as f:
        [row] = list(csv.DictReader(f))
    assert row["precision"] == "int8" and row["node_id"] == _edge_id(cluster)
    from tuner import device

    [rec] = device.LatencyCache(opts.storage).records("sim")
    assert rec["variant"] == "int8_static" and rec["precision"] == "int8"  # the quantised model was timed
    b = load_bundle(str(summary.bundle))
    deploy, winner = b.meta["deploy_precision"], summary.latency["winner"]
    assert deploy["searched"] == "int8" and winner["deploy"] == deploy and winner["status"] == "timed"
    assert winner["precision"] == deploy["deployed"] and winner["node_id"] == _edge_id(cluster)
    if deploy["deployed"] == "int8":  # the export's tolerance accepted the static variant
        assert b.int8_variant == "int8_static" and b.meta["target_latency"]["precision"] == "int8"
    else:  # refused: the fp32 architecture was timed at hand-off and recorded
        assert "refused" in deploy["why"] and b.int8_variant is None
        assert b.meta["target_latency"]["precision"] == "fp32" and b.meta["target_latency"]["p50_ms"] > 0
    # a precision the search never timed (what an INT8 refusal deploys at) is timed at hand-off, on the edge node
    from tuner.latency_study import _winner_latency

    svc, setup = _service(opts.storage, "q8-handoff", warmup=2, runs=15)
    rec = _winner_latency(opts, summary, "fp32", setup)
    assert rec["precision"] == "fp32" and rec["p50_ms"] > 0 and rec["node_id"] == _edge_id(cluster)
    assert len(device.LatencyCache(opts.storage).records("sim")) == 2  # and cached with the int8 one
    import ray

    ray.kill(svc)
