"""Latency outputs of a study: ``latency_table.csv`` (one row per distinct architecture the study timed or
looked up) and ``pareto.png`` (validation metric vs p50 latency, the Pareto front marked)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.metric import get_metric
from tuner.device import LATENCY_MS
from tuner.storage import rdb_storage
from tuner.trial_record import TrialRecord
from tuner.trial_record import records as trial_records

if TYPE_CHECKING:
    import optuna


LATENCY_COLUMNS = [
    "architecture",
    "backbone",
    "head",
    "input_size",
    "precision",
    "batch",
    "p50_ms",
    "p90_ms",
    "kind",
    "target",
    "node_id",
    "device",
    "backend",
    "runs",
    "warmup",
    "trials",
    "rejected_trials",
    "best_value",
    "signature_key",
    "onnx_sha256",
]


def _device_label(dev: dict[str, Any]) -> str:
    if dev.get("gpu_name"):
        jp = f", {dev['jetpack']}" if dev.get("jetpack") else ""
        return f"{dev['gpu_name']} (TensorRT {dev.get('tensorrt_version')}{jp})"
    return f"{dev.get('cpu', '?')} ({dev.get('backend', '?')} {dev.get('onnxruntime_version', '')})".strip()


def latency_rows(study: optuna.Study | _AllTrials, records: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per distinct architecture among the study's trials, from the latency records."""
    m = get_metric(metric)
    by_key = {r["signature_key"]: r for r in records if "signature_key" in r}
    used: dict[str, list[TrialRecord]] = {}
    for t in trial_records(study):
        if t.latency_key:
            used.setdefault(t.latency_key, []).append(t)
    rows = []
    for k, trials in used.items():
        rec = by_key.get(k)
        if rec is None:
            continue
        sig, proto = rec["signature"], rec.get("protocol", {})
        values = [v for t in trials if (v := t.best(metric)) is not None]
        best = min(values, key=m.sort_key) if values else None
        rows.append(
            {
                "architecture": trials[0].latency_signature or k,
                "backbone": sig["backbone"],
                "head": sig["head"] + ("-" + "x".join(map(str, sig["head_hidden"])) if sig["head_hidden"] else ""),
                "input_size": "x".join(map(str, sig["input_size"])),
                "precision": sig["precision"],
                "batch": sig["batch"],
                "p50_ms": round(rec["p50_ms"], 4),
                "p90_ms": round(rec["p90_ms"], 4),
                "kind": rec.get("kind"),
                "target": rec.get("target"),
                "node_id": rec.get("node_id"),
                "device": _device_label(rec.get("device", {})),
                "backend": rec.get("backend"),
                "runs": proto.get("runs"),
                "warmup": proto.get("warmup"),
                "trials": len(trials),
                "rejected_trials": sum(bool(t.rejected_reason) for t in trials),
                "best_value": best,
                "signature_key": k,
                "onnx_sha256": rec.get("onnx_sha256"),
            }
        )
    rows.sort(key=lambda r: r["p50_ms"])
    return rows


def pareto_points(points: list[tuple[float, float]], mode: str) -> list[int]:
    """Indices of the non-dominated (metric, latency) points: better metric (``mode``) and lower latency."""
    sign = 1.0 if mode == "max" else -1.0
    front = []
    for i, (v, lat) in enumerate(points):
        dominated = any(
            (sign * v2 >= sign * v and lat2 <= lat) and (sign * v2 > sign * v or lat2 < lat)
            for j, (v2, lat2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _measured(trials: list[TrialRecord], metric: str) -> tuple[list[TrialRecord], list[tuple[float, float]]]:
    """The trials with both a best value of ``metric`` and a latency, and their (value, latency) points."""
    trained = [t for t in trials if t.best(metric) is not None and t.latency_ms is not None]
    return trained, [(float(t.best(metric) or 0.0), float(t.latency_ms or 0.0)) for t in trained]


def write_latency_outputs(
    study: optuna.Study, records: list[dict[str, Any]], out: Path, metric: str, max_latency_ms: float = 0.0
) -> dict[str, Any]:
    """Write ``latency_table.csv`` and ``pareto.png``; returns their paths and the Pareto front's trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latency_rows(study, records, metric)
    with open(out / "latency_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LATENCY_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    m = get_metric(metric)
    every = trial_records(study)
    trained, pts = _measured(every, metric)
    front = pareto_points(pts, m.mode)
    rejected = [t for t in every if t.rejected_reason]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    if pts:
        ax.scatter([p[1] for p in pts], [p[0] for p in pts], c="tab:blue", alpha=0.6, label="trained trials")
        fr = sorted((pts[i] for i in front), key=lambda p: p[1])
        ax.plot([p[1] for p in fr], [p[0] for p in fr], "o-", c="tab:red", label="Pareto front")
        for i in front:
            ax.annotate(
                f"#{trained[i].number}", (pts[i][1], pts[i][0]), fontsize=8, xytext=(3, 3), textcoords="offset points"
            )
    lat_rej = [t.latency_ms for t in rejected if t.latency_ms is not None]
    if lat_rej:
        ax.scatter(
            lat_rej,
            [ax.get_ylim()[0]] * len(lat_rej),
            marker="x",
            c="gray",
            label="rejected by --max-latency-ms (not trained)",
        )
    if max_latency_ms > 0:
        ax.axvline(max_latency_ms, ls="--", c="gray")
    kind = {r.get("kind") for r in rows}
    where = rows[0]["device"] if rows else "?"
    ax.set_xlabel("p50 latency (ms) " + ("measured on " + where if kind == {"device"} else "(estimate, driver node)"))
    ax.set_ylabel(m.label)
    ax.set_title(f"study {study.study_name}: {m.label} vs latency")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png")
    plt.close(fig)
    return {
        "latency_table": str(out / "latency_table.csv"),
        "pareto_png": str(out / "pareto.png"),
        "architectures_timed": len(rows),
        "pareto": [{"trial": trained[i].number, m.best_key: pts[i][0], LATENCY_MS: pts[i][1]} for i in front],
        "rejected_by_constraint": [t.number for t in rejected],
    }


class _AllTrials:
    """The trials of every study in a storage, as one ``get_trials`` (for the storage-wide latency table)."""

    def __init__(self, storage: Any, skip: str) -> None:
        import optuna

        self._trials = [
            t
            for summ in optuna.get_all_study_summaries(storage)
            if summ.study_name != skip
            for t in optuna.load_study(study_name=summ.study_name, storage=storage).get_trials(deepcopy=False)
        ]

    def get_trials(self, deepcopy: bool = False) -> list[Any]:
        return list(self._trials)


def write_storage_latency_table(
    storage_url: str, records: list[dict[str, Any]], metric: str, skip: str, out: Path
) -> Path | None:
    """With a SQLite storage outside ``out``: ``latency_table.csv`` next to the database too, one row per
    architecture timed for this target by any study in it (the latency cache is per storage, shared by its
    studies). None otherwise."""
    if not storage_url.startswith("sqlite:///"):
        return None

    path = Path(storage_url[len("sqlite:///") :]).resolve().parent / "latency_table.csv"
    if path.parent == Path(out).resolve():
        return None  # the study's own table is there
    rows = latency_rows(_AllTrials(rdb_storage(storage_url), skip), records, metric)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LATENCY_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path
