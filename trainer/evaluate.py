"""Evaluation: metrics from a confusion matrix, test-split report, robustness report, plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune.numeric import confusion_matrix
from edgetune.preprocess import PreprocessSpec


def metrics_from_confusion(cm: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1 from a confusion matrix (rows = truth)."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.astype(int).tolist(),
        "confusion_matrix": cm.tolist(),
    }


@torch.no_grad()
def predict_arrays(model: torch.nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities for preprocessed NCHW float32 arrays."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        out.append(torch.softmax(model(torch.from_numpy(x[i : i + batch_size])), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, ds: Any, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, K], labels [N]) for an eval dataset yielding (tensor, label)."""
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    probs, labels = [], []
    for x, y in loader:
        probs.append(torch.softmax(model(x), 1).numpy())
        labels.append(np.asarray(y))
    return np.concatenate(probs), np.concatenate(labels)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "Confusion matrix") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * k, 1.0 + 0.8 * k), dpi=110)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    thresh = cm.max() / 2 if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if cm[i, j] > thresh else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def test_report(
    model: torch.nn.Module, test_ds: Any, classes: list[str], out_dir: str | Path, batch_size: int = 64
) -> dict[str, Any]:
    """Evaluate on the test split; writes confusion_matrix.{png,json} and test_predictions.json (every test
    item with its label, prediction and probabilities, for paired comparisons); returns test_* metrics."""
    probs, labels = predict_dataset(model, test_ds, batch_size)
    sources = [test_ds.source(i) if hasattr(test_ds, "source") else str(i) for i in range(len(labels))]
    return report_from_probs(probs, labels, sources, classes, out_dir)


def report_from_probs(
    probs: np.ndarray, labels: np.ndarray, sources: list[str], classes: list[str], out_dir: str | Path
) -> dict[str, Any]:
    """:func:`test_report`'s files and metrics from test probabilities already computed (a study's final model
    that is an ensemble: tuner/posthoc.py)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = len(classes)
    preds = probs.argmax(1)
    cm = confusion_matrix(labels, preds, k)
    m = metrics_from_confusion(cm)
    (out / "confusion_matrix.json").write_text(json.dumps({"classes": classes, "matrix": cm.tolist()}, indent=2))
    items = [
        {
            "source": src,
            "label": classes[int(y)],
            "prediction": classes[int(p)],
            "probs": [round(float(v), 6) for v in pr],
        }
        for src, y, p, pr in zip(sources, labels, preds, probs, strict=True)
    ]
    (out / "test_predictions.json").write_text(json.dumps({"classes": classes, "items": items}))
    plot_confusion(cm, classes, out / "confusion_matrix.png", title=f"test accuracy {m['accuracy']:.3f}")
    per_class = {
        c: {"precision": m["precision"][i], "recall": m["recall"][i], "f1": m["f1"][i], "support": m["support"][i]}
        for i, c in enumerate(classes)
    }
    return {
        "test_accuracy": m["accuracy"],
        "test_macro_f1": m["macro_f1"],
        "test_images": int(len(labels)),
        "test_per_class": per_class,
        "test_confusion_matrix": cm.tolist(),
    }


def _brightness_crop(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    scale = rng.uniform(0.6, 0.9)
    ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = img[top : top + ch, left : left + cw].astype(np.float32) * rng.uniform(0.6, 1.4)
    return np.clip(crop, 0, 255).astype(np.uint8)


def robustness_report(
    model: torch.nn.Module, test_ds: Any, spec: PreprocessSpec, out_dir: str | Path, seed: int = 0, batch_size: int = 64
) -> dict[str, float]:
    """Rock paper's field tests: accuracy on downsampled (½, ¼, ⅛) and cropped+brightened test images."""
    import cv2

    rng = np.random.default_rng(seed)
    raws = [test_ds.raw(i) for i in range(len(test_ds))]
    labels = np.array([lab for _, lab in raws])
    conditions: dict[str, list[np.ndarray]] = {
        "original": [],
        "down_1/2": [],
        "down_1/4": [],
        "down_1/8": [],
        "crop_brightness": [],
    }
    for img, _ in raws:
        conditions["original"].append(img)
        h, w = img.shape[:2]
        for f, name in ((2, "down_1/2"), (4, "down_1/4"), (8, "down_1/8")):
            small = cv2.resize(img, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
            conditions[name].append(small.reshape(small.shape[0], small.shape[1], -1))
        conditions["crop_brightness"].append(_brightness_crop(img, rng))
    result = {}
    for name, imgs in conditions.items():
        x = spec.apply_batch(imgs)
        probs = predict_arrays(model, x, batch_size)
        result[name] = float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0
    out = Path(out_dir)
    (out / "robustness.json").write_text(json.dumps(result, indent=2))
    lines = ["| condition | test accuracy |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in result.items()]
    (out / "robustness.md").write_text("\n".join(lines) + "\n")
    _bar_plot(result, out / "robustness.png")
    return result


def _bar_plot(values: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=110)
    ax.bar(list(values), list(values.values()), color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title("Robustness (downsampling, crop + brightness)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "learning curves") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    a1.plot(ep, [h["train_loss"] for h in history], label="train")
    a1.plot(ep, [h["val_loss"] for h in history], label="val")
    a1.set_title("loss")
    a1.set_xlabel("epoch")
    a1.legend()
    a2.plot(ep, [h["train_acc"] for h in history], label="train acc")
    a2.plot(ep, [h["val_acc"] for h in history], label="val acc")
    a2.plot(ep, [h["val_macro_f1"] for h in history], label="val macro-F1")
    a2.set_ylim(0, 1)
    a2.set_xlabel("epoch")
    a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
