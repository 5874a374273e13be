"""Helpers of bench_search.py: test metrics of a checkpoint, the epoch events of a Tune experiment, and
best-so-far curves (model selected by validation accuracy, its test accuracy read off)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def test_metrics(ckpt_dir: Path, data: Any) -> dict[str, float]:
    """Test accuracy and macro-F1 of a checkpoint on ``data.test``."""
    import torch

    from trainer.loop import evaluate_loader
    from trainer.run import model_from_checkpoint

    model, _ = model_from_checkpoint(ckpt_dir)
    loader = torch.utils.data.DataLoader(data.test, batch_size=64)
    m = evaluate_loader(model, loader, torch.nn.CrossEntropyLoss(), len(data.classes), torch.device("cpu"))
    return {"test_acc": float(m["accuracy"]), "test_macro_f1": float(m["macro_f1"])}


test_metrics.__test__ = False  # type: ignore[attr-defined]


def _kept_checkpoint(trial_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint Tune kept for a trial (``num_to_keep=1`` by val_acc: its best-val epoch) and its epoch."""
    kept = sorted(p for p in trial_dir.glob("checkpoint_*") if (p / "model.pt").is_file())
    if not kept:
        return None
    ck = kept[-1]
    meta = json.loads((ck / "checkpoint.json").read_text())
    return ck, int(meta["epoch"])


def tune_events(exp_dir: Path, data: Any) -> list[dict[str, Any]]:
    """One event per epoch reported by any trial of a Tune experiment, in report order (Ray's ``timestamp``,
    then the trial's ``time_total_s``). The event of a trial's kept (best-val) epoch carries its val and
    test metrics: from then on that model is a candidate for selection."""
    rows = []
    for i, trial_dir in enumerate(sorted(p for p in exp_dir.iterdir() if (p / "result.json").is_file())):
        results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
        kept = _kept_checkpoint(trial_dir)
        test = test_metrics(kept[0], data) if kept else None
        for r in results:
            ev: dict[str, Any] = {"id": i, "trial": trial_dir.name, "epoch": int(r["epoch"]),
                                  "order": (float(r["timestamp"]), float(r["time_total_s"]))}
            if kept and test and int(r["epoch"]) == kept[1]:
                ev.update(val_acc=float(r["val_acc"]), val_macro_f1=float(r["val_macro_f1"]), **test)
            rows.append(ev)
    rows.sort(key=lambda e: e["order"])
    for n, e in enumerate(rows, 1):
        e["cum_epochs"] = n
        e["order"] = list(e["order"])
    return rows


def curve_from_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best-so-far curve: at each event, the candidate with the highest (val_acc, val_macro_f1) so far."""
    best: dict[str, Any] | None = None
    curve = []
    for e in sorted(events, key=lambda e: e["cum_epochs"]):
        if e.get("val_acc") is not None and (best is None or (e["val_acc"], e["val_macro_f1"]) >
                                             (best["val_acc"], best["val_macro_f1"])):
            best = e
        if best is not None:
            curve.append({"cum_epochs": e["cum_epochs"], "val_acc": best["val_acc"],
                          "val_macro_f1": best["val_macro_f1"], "test_acc": best["test_acc"],
                          "test_macro_f1": best["test_macro_f1"], "selected": best["id"]})
    return curve


def first_reach(curve: list[dict[str, Any]], target: float) -> int | None:
    """Cumulative epochs at which the selected model's test accuracy first reaches ``target``."""
    for c in curve:
        if c["test_acc"] >= target - 1e-12:
            return int(c["cum_epochs"])
    return None
