"""Device in the loop: latency from the exclusive timing task on an edge node vs the old in-trial measurement.

Same ONNX files for every method: one export per architecture (backbone x input size, untrained: latency depends
on the architecture, not the weights). Three measurements of each, in interleaved rounds:

* **in-trial** (the protocol before issue 13, ``trainer.latency.time_onnx_in_trial``): ONNX Runtime, one thread,
  1 warm-up, 20 runs, in a Ray task on the training node while a training process (a real fwd/bwd loop of
  EfficientNet-Lite0, one torch thread: what a concurrent trial does) runs on the same 2-core node.
* **exclusive** (``make tune TARGET=…``): the timing task pinned to ``edge_target:sim`` on an edge node
  (``tuner.device``/``edge_server.agent.timing``: the product's protocol, 20 warm-up, 100 runs, p50/p90), while the same
  training load runs.
  The sim edge node is pinned to CPU 1 and the training load to CPU 0: on one machine that stands in for what a
  real target is, a separate device that does no training.
* **reference**: an isolated re-measurement of the same files, nothing else running, 50 warm-up + 400 runs.

Reported per method: the spread of each architecture's runs (p90/p50) and the rank agreement (Kendall tau-b)
of its p50 ranking with the reference ranking, per round and pooled. Headline in bench/results/device.json:
``kendall_tau_exclusive`` and ``kendall_tau_in_trial`` (median over rounds). Target: tau >= 0.9 (exclusive).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, parse_args, work_dir, write_results  # noqa: E402

from edgetune.device import TimingProtocol  # noqa: E402

#: Close neighbours on purpose (Lite0 vs Lite1, input sizes 16 px apart): a ranking only says something when
#: some architectures are nearly as fast as others.
BUDGET = {
    "small": {
        "backbones": ["efficientnet_lite0", "efficientnet_lite1", "mobilenet_v2"],
        "sizes": [96, 112, 128, 160],
        "rounds": 3,
    },
    "large": {
        "backbones": ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2", "resnet18"],
        "sizes": [96, 112, 128, 144, 160, 192, 224],
        "rounds": 5,
    },
}
EXCLUSIVE = {**TimingProtocol().to_dict()}  # what `make tune TARGET=…` uses
REFERENCE_WARMUP, REFERENCE_RUNS = 50, 400

LOAD = """
import torch, sys
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from trainer.config import ModelConfig
from trainer.model import create_model
m = create_model(ModelConfig(backbone="efficientnet_lite0", weights="none", img_size=128), 4).train()
opt = torch.optim.SGD(m.parameters(), lr=1e-3)
x, y = torch.randn(16, 3, 128, 128), torch.randint(0, 4, (16,))
print("load running", flush=True)
while True:
    opt.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); opt.step()
"""


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two equally long value lists."""
    n, conc, disc, ta, tb = len(a), 0, 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ta += 1
            elif db == 0:
                tb += 1
            elif da == db:
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + ta) * (conc + disc + tb)) ** 0.5
    return float((conc - disc) / denom) if denom else 0.0


def export_architectures(work: Path, backbones: list[str], sizes: list[int]) -> list[dict[str, Any]]:
    from trainer.config import ModelConfig
    from trainer.export import bundle_files, write_architecture_bundle
    from trainer.model import create_model, preprocess_spec_for

    archs = []
    for b in backbones:
        for s in sizes:
            cfg = ModelConfig(backbone=b, weights="none", img_size=s)
            d = write_architecture_bundle(create_model(cfg, 4), preprocess_spec_for(cfg), 4, work / f"{b}-{s}", b)
            archs.append({"name": f"{b}@{s}", "dir": d, "files": bundle_files(d), "size": s})
    return archs


def start_load() -> subprocess.Popen[bytes]:
    root = str(Path(__file__).resolve().parents[1])
    p = subprocess.Popen(
        [sys.executable, "-c", LOAD.format(root=root)],
        stdout=subprocess.PIPE,
        preexec_fn=lambda: os.sched_setaffinity(0, {0}) if hasattr(os, "sched_setaffinity") else None,
        start_new_session=True,
    )
    assert p.stdout is not None
    p.stdout.readline()  # "load running"
    time.sleep(2.0)
    return p


def reference(archs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Isolated re-measurement: nothing else running, the server's runner, many runs."""
    from edge_server.agent.timing import time_bundle
    from edgetune.device import TimingProtocol

    proto = TimingProtocol(warmup=REFERENCE_WARMUP, runs=REFERENCE_RUNS)
    return [time_bundle(a["dir"], protocol=proto, backend="onnxruntime") for a in archs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n")[0], argv)
    b = BUDGET[args.budget]
    work = work_dir(args, "edgetune-bench-device-")
    import ray
    from ray.cluster_utils import Cluster

    from tuner import device

    t0 = time.perf_counter()
    archs = export_architectures(work, b["backbones"], b["sizes"])
    print(f"bench: exported {len(archs)} architectures in {time.perf_counter() - t0:.1f} s")
    ref = reference(archs)  # before anything else runs on the machine
    all_cpus = os.sched_getaffinity(0)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    os.sched_setaffinity(0, {1} if 1 in all_cpus else all_cpus)  # the edge node's processes inherit CPU 1
    edge = c.add_node(num_cpus=0, resources={"edge_target:sim": 1})
    os.sched_setaffinity(0, all_cpus)
    ray.init(address=c.address, logging_level="ERROR")
    c.wait_for_nodes()
    load = start_load()
    rounds: list[dict[str, Any]] = []
    try:
        from trainer.latency import time_onnx_in_trial

        in_trial_task = ray.remote(num_cpus=1)(time_onnx_in_trial)
        exclusive_task = ray.remote(device.time_on_node).options(**device.task_options("sim"))
        for r in range(b["rounds"]):
            order = archs if r % 2 == 0 else archs[::-1]
            rec: dict[str, Any] = {"in_trial": {}, "exclusive": {}, "exclusive_nodes": set()}
            for a in order:
                times = ray.get(in_trial_task.remote(str(a["dir"] / "model.onnx"), (a["size"], a["size"])))
                rec["in_trial"][a["name"]] = {
                    "p50_ms": float(np.percentile(times, 50)),
                    "p90_ms": float(np.percentile(times, 90)),
                }
                ex = ray.get(exclusive_task.remote(a["files"], "fp32", EXCLUSIVE, "onnxruntime"))
                rec["exclusive"][a["name"]] = {"p50_ms": ex["p50_ms"], "p90_ms": ex["p90_ms"]}
                rec["exclusive_nodes"].add(ex["node_id"])
            rounds.append(rec)
            print(f"bench: round {r + 1}/{b['rounds']} done")
    finally:
        os.killpg(load.pid, signal.SIGTERM)
        load.wait(30)
        ray.shutdown()
        c.shutdown()
    out, tables = summarise(rounds, [a["name"] for a in archs], ref, edge.node_id)
    write_results("device", out, args.out, tables=tables)
    return 0


def protocols() -> dict[str, Any]:
    """How each method measured (stored with the results)."""
    return {
        "in_trial": {
            "warmup": 1,
            "runs": 20,
            "threads": 1,
            "where": "Ray task on the training node, next to a training process",
        },
        "exclusive": {
            **EXCLUSIVE,
            "where": "timing task pinned to edge_target:sim (edge node on CPU 1, training load on CPU 0)",
        },
        "reference": {
            "warmup": REFERENCE_WARMUP,
            "runs": REFERENCE_RUNS,
            "where": "isolated, nothing else running",
        },
    }


def method_figures(
    rounds: list[dict[str, Any]], names: list[str], ref_p50: list[float], method: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One method's rank agreement with the reference and its p90/p50 spread: the result keys and its table row."""
    taus = [kendall_tau([rd[method][n]["p50_ms"] for n in names], ref_p50) for rd in rounds]
    pooled = [float(np.median([rd[method][n]["p50_ms"] for rd in rounds])) for n in names]
    spreads = [rd[method][n]["p90_ms"] / rd[method][n]["p50_ms"] for rd in rounds for n in names]
    fig = {
        f"kendall_tau_{method}": float(np.median(taus)),
        f"{method}_tau_per_round": taus,
        f"{method}_tau_pooled_median": kendall_tau(pooled, ref_p50),
        f"{method}_spread_p90_p50_median": float(np.median(spreads)),
        f"{method}_spread_p90_p50_max": float(np.max(spreads)),
    }
    row = {
        "method": method,
        "tau (median of rounds)": fig[f"kendall_tau_{method}"],
        "tau per round": " / ".join(f"{t:.2f}" for t in taus),
        "tau of round-median p50": fig[f"{method}_tau_pooled_median"],
        "spread p90/p50 median": fig[f"{method}_spread_p90_p50_median"],
        "spread p90/p50 max": fig[f"{method}_spread_p90_p50_max"],
    }
    return fig, row


def per_architecture(rounds: list[dict[str, Any]], names: list[str], ref: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "architecture": n,
            "reference p50": ref[i]["p50_ms"],
            "reference p90/p50": ref[i]["p90_ms"] / ref[i]["p50_ms"],
            **{
                f"{m} p50 (median)": float(np.median([rd[m][n]["p50_ms"] for rd in rounds]))
                for m in ("in_trial", "exclusive")
            },
        }
        for i, n in enumerate(names)
    ]


def summarise(
    rounds: list[dict[str, Any]], names: list[str], ref: list[dict[str, Any]], edge_id: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Headline, per-method rows and per-architecture rows of the measurements."""
    ref_p50 = [x["p50_ms"] for x in ref]
    out: dict[str, Any] = {"architectures": names, "rounds": len(rounds), "protocols": protocols()}
    rows = []
    for method in ("in_trial", "exclusive"):
        fig, row = method_figures(rounds, names, ref_p50, method)
        out.update(fig)
        rows.append(row)
    out["exclusive_ran_only_on_edge_node"] = all(rd["exclusive_nodes"] == {edge_id} for rd in rounds)
    per_arch = per_architecture(rounds, names, ref)
    out["per_architecture"] = per_arch
    out["target_tau"] = 0.9
    out["target_met"] = out["kendall_tau_exclusive"] >= 0.9
    return out, {
        "Latency rank agreement with an isolated re-measurement": md_table(rows, list(rows[0])),
        "Per architecture (ms)": md_table(per_arch, list(per_arch[0])),
    }


if __name__ == "__main__":
    sys.exit(main())
