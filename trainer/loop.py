"""The one training loop, used in-process, as a Ray Train (DDP) worker, and as a Tune trial.

``train_loop(loop_config)`` takes a :class:`trainer.loop_config.LoopConfig` (train config, run dir, reporter,
metrics reported every epoch, deadline, shared data source, whether to load the test split), or its dict form
(what Ray Train hands a worker); ``LoopConfig.coerce`` validates either in one place.

Steps (timm's train script split the same way): :func:`setup` (model, feeds, optimiser, resume),
:func:`train_one_epoch`, :func:`validate` (BatchNorm statistics recomputed first, per ``model.bn_stats``),
:func:`end_of_epoch` (the checkpoint policy: best-epoch rule of :mod:`trainer.metric`, when to save, report,
whether to stop); :func:`train_loop` runs them (:func:`run_epoch` = one training epoch plus its validation).

Per epoch it reports ``train_loss, train_acc, val_loss, val_acc, val_macro_f1, val_balanced_acc, epoch,
epoch_seconds, images_per_s, lr, best_<metric>, best_epoch, data_path`` and a self-describing checkpoint.
A run stops early, with ``stop_reason`` in its last result, when the loss diverges (NaN/inf: that epoch
scores the metric's worst value and gets no checkpoint; never retried) or when the next epoch would not end
before ``deadline`` (the wall-clock budget of a study).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from edgetune.numeric import confusion_matrix
from trainer.bnstats import recompute_bn_stats, suit_bn_momentum
from trainer.checkpoint import load_checkpoint, save_checkpoint, unwrap
from trainer.config import TrainConfig
from trainer.loop_config import LoopConfig
from trainer.metric import CHECKPOINT_SCORE, METRIC_NAMES, METRICS, Metric, get_metric
from trainer.optim import Schedule, build_optimizer, build_scheduler
from trainer.reporting import Reporter, make_reporter

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


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module,
    batches: Any,
    loss_fn: torch.nn.Module,
    num_classes: int,
    device: torch.device,
    amp: bool = False,
) -> dict[str, Any]:
    """Loss, accuracy, macro-F1, balanced accuracy and confusion matrix; summed across DDP ranks."""
    from trainer.evaluate import metrics_from_confusion

    model.eval()
    cm_np = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(x)
        loss_sum += loss_fn(logits.float(), y).double() * len(y)
        pred = logits.argmax(1)
        cm_np += confusion_matrix(y.cpu().numpy(), pred.cpu().numpy(), num_classes)
    if dist.is_available() and dist.is_initialized():
        cm = torch.from_numpy(cm_np).to(device=device, dtype=torch.float64)
        dist.all_reduce(cm)
        dist.all_reduce(loss_sum)
        cm_np = cm.cpu().numpy().astype(np.int64)
    out = metrics_from_confusion(cm_np)
    out["loss"] = float(loss_sum.item()) / max(1, int(cm_np.sum()))
    return out


def _maybe_inject_failure(epoch: int) -> None:
    at = os.environ.get(FAIL_AT_ENV)
    marker = os.environ.get(FAIL_MARKER_ENV)
    if at and marker and int(at) == epoch and not Path(marker).exists():
        Path(marker).write_text(f"failed once at epoch {epoch}\n")
        raise InjectedFailure(f"injected failure at epoch {epoch} (test switch {FAIL_AT_ENV})")


# -- the loop, in steps --------------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """Everything one run carries from epoch to epoch."""

    cfg: TrainConfig
    metric: Metric
    model: torch.nn.Module
    feeds: Any
    data: Any
    spec: Any
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    eval_loss: torch.nn.Module
    device: torch.device
    reporter: Reporter
    rank: int
    world: int
    use_amp: bool
    static: dict[str, Any]
    start_epoch: int = 1
    best: float | None = None
    best_epoch: int = 0
    train_seconds_total: float = 0.0
    bn_images: int = 0
    at_best: dict[str, float] = field(default_factory=dict)  #: validation metrics of the best epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0  #: the checkpoint's epoch this run resumed from (0: started fresh)


def setup(loop_config: LoopConfig | dict[str, Any], data: Any = None) -> LoopState:
    """Model (weights, freeze cut), feeds (cached or live path), loss, optimiser, schedule; resume if asked."""
    from trainer.losses import build_loss
    from trainer.model import preprocess_spec_for

    t_launch = time.perf_counter()
    lc = LoopConfig.coerce(loop_config)
    cfg = TrainConfig.from_dict(dict(lc.train_config))
    rank, world = _dist_info()
    device = _init_process(cfg, rank)
    spec = preprocess_spec_for(cfg.model)
    if data is None:
        data = _build_data(cfg, spec, lc, rank)
    model, feeds = _build_model(cfg, data, device, rank, world)
    reporter = make_reporter(
        lc.report_to, lc.run_dir, cfg.metric, cfg.mode
    )
    model = _wrap_ddp(model, world)
    opt = build_optimizer(cfg, model)
    module = unwrap(model)
    static = _static_info(module, feeds)
    st = LoopState(
        cfg=cfg,
        metric=get_metric(cfg.metric),
        model=model,
        feeds=feeds,
        data=data,
        spec=spec,
        opt=opt,
        sched=build_scheduler(cfg, opt, feeds.steps_per_epoch),
        scaler=torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda"),
        loss_fn=build_loss(cfg.loss, data.class_counts).to(device),
        eval_loss=torch.nn.CrossEntropyLoss(),  # comparable val_loss across focal settings
        device=device,
        reporter=reporter,
        rank=rank,
        world=world,
        use_amp=cfg.amp and device.type == "cuda",
        static=static,
    )
    _resume(st)
    static.update(lc.static_metrics)  # e.g. the architecture's latency (tuner/device.py)
    static["setup_seconds"] = time.perf_counter() - t_launch
    return st


def _init_process(cfg: TrainConfig, rank: int) -> torch.device:
    """Threads and seeds (per rank) of this process; the device it trains on."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    return _device(cfg)


def _build_data(cfg: TrainConfig, spec: Any, lc: LoopConfig, rank: int) -> Any:
    """The dataset splits (written under ``run_dir`` by rank 0 only)."""
    from trainer.data import build_data

    run_dir = lc.run_dir
    return build_data(
        cfg.data,
        spec,
        run_dir=run_dir if rank == 0 else None,
        seed=cfg.seed,
        source=lc.source,
        with_test=lc.with_test,
    )


def _build_model(
    cfg: TrainConfig, data: Any, device: torch.device, rank: int, world: int
) -> tuple[torch.nn.Module, Any]:
    """The model on ``device`` and its feeds (the cached path starts the model at its freeze cut)."""
    from trainer.feeds import make_feeds
    from trainer.model import create_model

    model: torch.nn.Module = create_model(cfg.model, num_classes=len(data.classes))
    feeds = make_feeds(cfg, model, data, rank, world)
    if feeds.path == "cached":
        model.input_cut = model.cut  # type: ignore[assignment]
    model = model.to(device)
    if cfg.channels_last:  # NHWC convolutions: ~20 % faster steps on CPU too (Lite0, 128 px, 2 threads)
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.bn_stats == "momentum":
        suit_bn_momentum(model, feeds.steps_per_epoch)
    return model, feeds


def _wrap_ddp(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """DistributedDataParallel through Ray Train when there is more than one worker; the model as is otherwise."""
    if world > 1:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)
    return model


def _static_info(module: Any, feeds: Any) -> dict[str, Any]:
    """What every epoch's result repeats: model size, node, data path, freeze cut, activation cache."""
    from trainer.model import count_params, model_size_mb

    return {
        "params": count_params(module),
        "size_mb": model_size_mb(module),
        "node_id": _node_id(),
        "data_path": feeds.path,
        "data_path_reason": feeds.reason,
        "freeze_cut": _report(module).get("cut", 0),
        "freeze_fraction": _report(module).get("fraction", 0.0),
        **{f"act_cache_{k}": v for k, v in feeds.cache_stats.items()},
    }


def _report(module: Any) -> dict[str, Any]:
    return dict(getattr(module, "freeze_report", {}) or {})


def _resume(st: LoopState) -> None:
    resume = st.reporter.resume_dir()
    if resume is None:
        return
    ckpt = load_checkpoint(resume)
    unwrap(st.model).load_state_dict(ckpt["model_state"])
    state = torch.load(resume / TRAIN_STATE, map_location="cpu", weights_only=True)
    st.opt.load_state_dict(state["optimizer"])
    st.sched.load_state_dict(state["scheduler"])
    st.start_epoch, st.best = int(state["epoch"]) + 1, state.get("best")
    st.best_epoch = int(state.get("best_epoch", 0))
    st.at_best = dict(state.get("at_best", {}))
    st.train_seconds_total = float(state.get("train_seconds", 0.0))
    st.static.update({k: v for k, v in state.get("static", {}).items() if k not in ("setup_seconds",)})
    st.history = list(ckpt["meta"].get("history", []))
    st.resumed_from_epoch = int(state["epoch"])


def train_one_epoch(st: LoopState, epoch: int, progress: Any = None) -> dict[str, Any]:
    """One pass over the training feed; stops at the first non-finite loss (``diverged``)."""
    from trainer.model import set_train_mode

    set_train_mode(st.model)
    t0 = time.perf_counter()
    seen, loss_sum, correct, diverged = 0, 0.0, 0, False
    batches = st.feeds.train(epoch)
    for x, y in progress(batches) if progress else batches:
        st.static.setdefault("first_batch_at", time.time())  # unix time: trial launch -> first batch overhead
        x, y = x.to(st.device, non_blocking=True), y.to(st.device, non_blocking=True)
        if st.cfg.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(st.device.type, enabled=st.use_amp):
            logits = st.model(x)
            loss = st.loss_fn(logits.float(), y)
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if st.world > 1:  # every rank stops together (one rank leaving backward's all-reduce would hang the rest)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            diverged = True
            break
        st.opt.zero_grad(set_to_none=True)
        st.scaler.scale(loss).backward()
        st.scaler.step(st.opt)
        st.scaler.update()
        st.sched.step()
        seen += len(y)
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
    totals = torch.tensor([seen, loss_sum, correct, float(diverged)], dtype=torch.float64)
    if st.world > 1:
        dist.all_reduce(totals)
    seconds = time.perf_counter() - t0
    n = max(1.0, float(totals[0]))
    return {
        "train_loss": float(totals[1]) / n,
        "train_acc": float(totals[2]) / n,
        "seen": n,
        "train_phase_seconds": seconds,
        "images_per_s": n / max(seconds, 1e-9),
        "diverged": bool(totals[3] > 0),
    }


def validate(st: LoopState) -> dict[str, Any]:
    """BatchNorm statistics per ``model.bn_stats`` (recomputed on training images), then the validation split."""
    if st.cfg.model.bn_stats == "recompute":
        st.bn_images = recompute_bn_stats(st.model, st.feeds.bn(), st.device)
    val = evaluate_batches(st.model, st.feeds.val(), st.eval_loss, len(st.data.classes), st.device, st.use_amp)
    recall = [r for r, s in zip(val["recall"], val["support"], strict=True) if s > 0]
    return {
        "val_loss": val["loss"],
        "val_acc": val["accuracy"],
        "val_macro_f1": val["macro_f1"],
        "val_balanced_acc": float(np.mean(recall)) if recall else 0.0,
    }


# -- checkpoint policy: when to stop, which epoch is best (trainer.metric's rule), when to save -------------------
def end_of_epoch(st: LoopState, epoch: int, metrics: dict[str, Any], deadline: float | None) -> bool:
    """Best-epoch rule, checkpoint, report; returns whether the run stops here."""
    stop = _stop_reason(st, epoch, metrics, deadline)
    _update_best(st, epoch, metrics, stop)
    if stop:
        metrics["stop_reason"] = stop
    st.history.append({k: v for k, v in metrics.items() if k not in st.static})
    with tempfile.TemporaryDirectory(prefix="edgetune-ckpt-") as tmp:
        ckpt_dir = _save(st, tmp, epoch, metrics) if _should_save(st, stop) else None
        st.reporter.report(metrics, ckpt_dir)
    return bool(stop)


def _stop_reason(st: LoopState, epoch: int, metrics: dict[str, Any], deadline: float | None) -> str:
    """``diverged`` (the epoch then scores the metric's worst value), ``deadline`` (the next epoch would end after
    it), or "" to go on. Pops ``diverged`` from ``metrics``."""
    if metrics.pop("diverged"):
        metrics.update({name: metric.worst for name, metric in METRICS.items()})
        return "diverged"
    if deadline is not None and epoch < st.cfg.epochs and time.time() + metrics["epoch_seconds"] > deadline:
        return "deadline"
    return ""


def _update_best(st: LoopState, epoch: int, metrics: dict[str, Any], stop: str) -> None:
    """The best-epoch rule of :mod:`trainer.metric` (a diverged epoch never becomes best); adds ``best_<metric>``,
    ``best_epoch``, ``resumed_from_epoch``, the checkpoint score and the best epoch's validation metrics."""
    m = st.metric
    improved = not stop or stop == "deadline"
    if improved and m.better(metrics[m.name], st.best):
        st.best, st.best_epoch = metrics[m.name], epoch
        st.at_best = {f"{k}_at_best": metrics[k] for k in METRIC_NAMES}
    metrics[m.best_key] = st.best if st.best is not None else m.worst
    metrics["best_epoch"] = st.best_epoch
    metrics["resumed_from_epoch"] = st.resumed_from_epoch  # tells a resume from a restart in the history
    metrics[CHECKPOINT_SCORE] = epoch if st.best_epoch == epoch else -1
    metrics.update(st.at_best)


def _should_save(st: LoopState, stop: str) -> bool:
    """Every epoch gets a checkpoint, written by rank 0, except a diverged one (its weights are not finite)."""
    return st.rank == 0 and stop != "diverged"


def _save(st: LoopState, tmp: str, epoch: int, metrics: dict[str, Any]) -> Path:
    module = unwrap(st.model)
    extra = {
        "dataset": st.data.dataset_name,
        "dataset_hash": st.data.dataset_hash,
        "history": st.history,
        "weights_source": getattr(module, "weights_source", ""),
        "weights_tag": getattr(module, "weights_tag", ""),
        "freeze": dict(getattr(module, "freeze_report", {})),
        "bn_stats": {"method": st.cfg.model.bn_stats, "images": st.bn_images},
        "data_path": st.feeds.path,
    }
    cut = getattr(module, "input_cut", 0)
    module.input_cut = 0  # type: ignore[assignment]  # a checkpoint is always the image -> logits model
    try:
        d = save_checkpoint(tmp, st.model, st.cfg.to_dict(), st.data.classes, st.spec, epoch, metrics, extra=extra)
    finally:
        module.input_cut = cut  # type: ignore[assignment]
    torch.save(
        {
            "optimizer": st.opt.state_dict(),
            "scheduler": st.sched.state_dict(),
            "epoch": epoch,
            "best": st.best,
            "best_epoch": st.best_epoch,
            "at_best": st.at_best,
            "train_seconds": st.train_seconds_total,
            "static": st.static,
        },
        Path(tmp) / TRAIN_STATE,
    )
    return d


def train_loop(loop_config: LoopConfig | dict[str, Any], data: Any = None) -> dict[str, Any]:
    """Train per ``loop_config``; returns the last epoch's metrics (also reported each epoch)."""
    lc = LoopConfig.coerce(loop_config)
    st = setup(lc, data)
    deadline = lc.deadline
    report_to = lc.report_to
    last: dict[str, Any] = {}
    epoch = st.start_epoch
    while epoch <= st.cfg.epochs:
        metrics = run_epoch(st, epoch, report_to)
        if epoch == st.start_epoch and lc.fit_to_deadline and deadline and not metrics["diverged"]:
            fit_epochs_to_deadline(st, epoch, metrics["epoch_seconds"], deadline)
        stop = end_of_epoch(st, epoch, metrics, deadline)
        last = metrics
        if stop:
            break
        _maybe_inject_failure(epoch)
        epoch += 1
    return last


def run_epoch(st: LoopState, epoch: int, report_to: str) -> dict[str, Any]:
    """One training epoch and its validation (none after a diverged one); the epoch's metrics, ``diverged`` among
    them, before the checkpoint policy (:func:`end_of_epoch`) adds the best-epoch keys."""
    t0 = time.perf_counter()
    tr = train_one_epoch(st, epoch, _progress(st, epoch, report_to))
    val = validate(st) if not tr["diverged"] else {}
    st.train_seconds_total += time.perf_counter() - t0
    return {
        **st.static,
        "epoch": epoch,
        **tr,
        **val,
        "epoch_seconds": time.perf_counter() - t0,
        "lr": st.opt.param_groups[-1]["lr"],
        "train_seconds": st.train_seconds_total,
    }


def fit_epochs_to_deadline(st: LoopState, epoch: int, epoch_seconds: float, deadline: float) -> int:
    """After the first epoch: shorten the run (``cfg.epochs`` is the most) to the epochs that end before
    ``deadline`` at the measured speed, and stretch the LR schedule over exactly those, so the last epoch
    anneals instead of being cut off mid-schedule (the refit uses this). Single-worker runs only."""
    if st.world > 1:
        return st.cfg.epochs
    fit = epoch + int(max(0.0, deadline - time.time()) // max(epoch_seconds, 1e-6))
    n = max(epoch, min(st.cfg.epochs, fit))
    if n != st.cfg.epochs:
        st.cfg = st.cfg.replace({"epochs": n})
        for fn in st.sched.lr_lambdas:
            if isinstance(fn, Schedule):
                fn.total = max(1, n * st.feeds.steps_per_epoch)
    st.static["epochs_planned"] = n
    return n


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` entry (one argument, as Ray Train requires)."""
    train_loop(loop_config)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # noqa: BLE001 - outside Ray
        return "local"


def _progress(st: LoopState, epoch: int, report_to: str) -> Any:
    if not st.cfg.progress or st.rank != 0 or report_to != "local":
        return None
    from tqdm import tqdm

    total = st.feeds.steps_per_epoch

    def wrap(it: Any) -> Any:
        return tqdm(
            it, total=total, desc=f"epoch {epoch}/{st.cfg.epochs}", unit="batch", leave=False, dynamic_ncols=True
        )

    return wrap
