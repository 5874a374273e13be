"""The one training loop, used in-process, as a Ray Train (DDP) worker, and as a Tune trial.

``train_loop(loop_config)`` takes a plain dict (serialisable for Ray)::

    {"train_config": TrainConfig.to_dict(), "run_dir": str | None, "report_to": "local"|"ray_train"|"tune",
     "resume": bool}

Per epoch it reports ``train_loss, train_acc, val_loss, val_acc, val_macro_f1, epoch, epoch_seconds,
images_per_s, lr`` and a self-describing checkpoint (weights, config, classes, preprocessing spec,
versions + optimiser state for resuming).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from trainer.checkpoint import load_checkpoint, save_checkpoint, unwrap
from trainer.config import TrainConfig
from trainer.reporting import make_reporter

TRAIN_STATE = "train_state.pt"
#: Test-only failure injection: fail once at this epoch (1-based) unless the marker file exists.
FAIL_AT_ENV, FAIL_MARKER_ENV = "EDGETUNE_FAIL_AT_EPOCH", "EDGETUNE_FAIL_MARKER"


class InjectedFailure(RuntimeError):
    """Raised by the test-only failure switch."""


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.use_gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        try:
            import ray.train

            return ray.train.torch.get_device()
        except Exception:  # noqa: BLE001 - not inside Ray Train
            return torch.device("cuda", local)
    return torch.device("cpu")


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    from trainer.model import param_groups

    module = unwrap(model)
    groups = param_groups(module, cfg.optim.lr, cfg.optim.backbone_lr_mult, cfg.optim.weight_decay)  # type: ignore[arg-type]
    o = cfg.optim
    if o.optimizer == "adam":
        return torch.optim.Adam(groups, lr=o.lr)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.optim.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _loader(ds: Dataset, cfg: TrainConfig, shuffle: bool, seed: int, rank: int, world: int, drop_last: bool) -> DataLoader:
    sampler: torch.utils.data.Sampler | None = None
    if world > 1:
        if shuffle:
            sampler = torch.utils.data.distributed.DistributedSampler(ds, world, rank, shuffle=True, seed=seed,
                                                                      drop_last=drop_last)
        else:  # evaluation: disjoint shards without padding, results are summed across ranks
            ds = Subset(ds, list(range(rank, len(ds), world)))  # type: ignore[arg-type]
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=cfg.data.loader_workers, drop_last=drop_last, generator=g,
                      persistent_workers=cfg.data.loader_workers > 0)


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader: DataLoader, loss_fn: torch.nn.Module, num_classes: int,
                    device: torch.device, amp: bool = False) -> dict[str, Any]:
    """Loss, accuracy, macro-F1 and confusion matrix; summed across DDP ranks when distributed."""
    from trainer.evaluate import metrics_from_confusion

    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(x)
        loss_sum += loss_fn(logits.float(), y).double() * len(y)
        pred = logits.argmax(1)
        cm += torch.bincount(y * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cm)
        dist.all_reduce(loss_sum)
    cm_np = cm.cpu().numpy().astype(np.int64)
    n = max(1, int(cm_np.sum()))
    out = metrics_from_confusion(cm_np)
    out["loss"] = float(loss_sum.item()) / n
    return out


def _maybe_inject_failure(epoch: int) -> None:
    at = os.environ.get(FAIL_AT_ENV)
    marker = os.environ.get(FAIL_MARKER_ENV)
    if at and marker and int(at) == epoch and not Path(marker).exists():
        Path(marker).write_text(f"failed once at epoch {epoch}\n")
        raise InjectedFailure(f"injected failure at epoch {epoch} (test switch {FAIL_AT_ENV})")


def train_loop(loop_config: dict[str, Any], data: Any = None) -> dict[str, Any]:
    """Train per ``loop_config``; returns the last epoch's metrics (also reported each epoch)."""
    from trainer.data import build_data
    from trainer.losses import build_loss
    from trainer.model import create_model, preprocess_spec_for, set_train_mode

    cfg = TrainConfig.from_dict(loop_config["train_config"])
    run_dir = loop_config.get("run_dir")
    rank, world = _dist_info()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    device = _device(cfg)
    spec = preprocess_spec_for(cfg.model)
    if data is None:
        data = build_data(cfg.data, spec, run_dir=run_dir if rank == 0 else None, seed=cfg.seed)
    classes, k = data.classes, len(data.classes)
    model: torch.nn.Module = create_model(cfg.model, num_classes=k).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    reporter = make_reporter(loop_config.get("report_to", "local"), run_dir, cfg.metric, cfg.mode,
                             resume=bool(loop_config.get("resume")))
    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model, move_to_device=False)
    loss_fn = build_loss(cfg.loss, data.class_counts).to(device)
    eval_loss = torch.nn.CrossEntropyLoss()  # comparable val_loss across focal settings
    train_loader = _loader(data.train, cfg, True, cfg.seed, rank, world, drop_last=len(data.train) > cfg.batch_size * world)
    val_loader = _loader(data.val, cfg, False, cfg.seed, rank, world, drop_last=False)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, max(1, len(train_loader)))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    from trainer.model import count_params, model_size_mb

    module = unwrap(model)
    static: dict[str, Any] = {"params": count_params(module), "size_mb": model_size_mb(module), "node_id": _node_id()}
    start_epoch, best, train_seconds_total = 1, None, 0.0
    history: list[dict[str, Any]] = []
    resume = reporter.resume_dir()
    if resume is not None:
        ckpt = load_checkpoint(resume)
        unwrap(model).load_state_dict(ckpt["model_state"])
        state = torch.load(resume / TRAIN_STATE, map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best = int(state["epoch"]) + 1, state.get("best")
        train_seconds_total = float(state.get("train_seconds", 0.0))
        static.update(state.get("static", {}))
        history = list(ckpt["meta"].get("history", []))
    if loop_config.get("measure_latency") and rank == 0 and "latency_ms" not in static:
        from trainer.export import measure_latency

        static["latency_ms"] = measure_latency(module, spec)

    last: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        if isinstance(train_loader.sampler, torch.utils.data.distributed.DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        set_train_mode(model)
        t0 = time.perf_counter()
        seen, loss_sum, correct = 0, 0.0, 0
        bar = _progress(train_loader, cfg, rank, epoch, loop_config.get("report_to", "local"))
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda" and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch} (lr {cfg.optim.lr} too high?)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
        train_seconds = time.perf_counter() - t0
        val = evaluate_loader(model, val_loader, eval_loss, k, device, use_amp)
        totals = torch.tensor([seen, loss_sum, correct], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)
        seen_all = max(1.0, float(totals[0]))
        train_seconds_total += time.perf_counter() - t0
        metrics = {
            **static,
            "epoch": epoch,
            "train_loss": float(totals[1]) / seen_all,
            "train_acc": float(totals[2]) / seen_all,
            "val_loss": val["loss"],
            "val_acc": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "epoch_seconds": time.perf_counter() - t0,
            "images_per_s": seen_all / max(train_seconds, 1e-9),
            "lr": opt.param_groups[-1]["lr"],
            "train_seconds": train_seconds_total,
        }
        value = metrics[cfg.metric]
        if best is None or (value > best if cfg.mode == "max" else value < best):
            best = value
        metrics[f"best_{cfg.metric}"] = best
        history.append({k: v for k, v in metrics.items() if k not in static})
        ckpt_dir = None
        with tempfile.TemporaryDirectory(prefix="edgetune-ckpt-") as tmp:
            if rank == 0:
                ckpt_dir = save_checkpoint(tmp, model, cfg.to_dict(), classes, spec, epoch, metrics,
                                           extra={"dataset": data.dataset_name, "dataset_hash": data.dataset_hash,
                                                  "history": history})
                torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                            "best": best, "train_seconds": train_seconds_total, "static": static},
                           Path(tmp) / TRAIN_STATE)
            reporter.report(metrics, ckpt_dir)
        last = metrics
        _maybe_inject_failure(epoch)
    return last


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` entry (one argument, as Ray Train requires)."""
    train_loop(loop_config)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # noqa: BLE001 - outside Ray
        return "local"


def _progress(loader: DataLoader, cfg: TrainConfig, rank: int, epoch: int, report_to: str) -> Any:
    if not cfg.progress or rank != 0 or report_to != "local":
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, dynamic_ncols=True)
