"""The training loop's setup (:func:`trainer.loop.train_loop`'s first step) and the state it carries.

:func:`setup` builds a :class:`LoopState` from a :class:`trainer.loop_config.LoopConfig` (or its dict form): this
process's threads, seeds and device, the dataset splits, the model (weights, freeze cut) and its feeds (cached or
live path), loss, optimiser and schedule, wrapped for DDP when there is more than one worker; then resumes from the
reporter's checkpoint when there is one (weights, optimiser and schedule state, best epoch, history:
:data:`TRAIN_STATE` next to the checkpoint, written by :func:`trainer.loop.end_of_epoch`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.bnstats import suit_bn_momentum
from trainer.checkpoint import DAMAGED_FILE_ERRORS, WEIGHTS_FILE, UnreadableCheckpoint, load_checkpoint, unwrap
from trainer.config import TrainConfig
from trainer.ema import Ema
from trainer.feeds import make_feeds
from trainer.loop_config import LoopConfig
from trainer.losses import build_loss
from trainer.metric import Metric, get_metric
from trainer.optim import build_optimizer, build_scheduler
from trainer.reporting import Reporter, make_reporter
from trainer.train_state import TrainState

#: The optimiser/schedule/best-epoch state saved next to each checkpoint (what a resume reads back).
TRAIN_STATE = "train_state.pt"
#: What tuner/_ray_compat.fill_deleted_checkpoints puts in a stand-in for a checkpoint Ray's retention deleted (the
#: trainer reads the name, it does not import the tuner).
DELETED_CHECKPOINT_MARKER = ".edgetune-deleted-checkpoint"
log = logging.getLogger(__name__)


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
    ema: Any = None  #: trainer.ema.Ema when optim.ema_decay > 0 (weight averaging)
    epoch_weights: str = "raw"  #: which weights this epoch's result and checkpoint are: raw | ema


def setup(loop_config: LoopConfig | dict[str, Any], data: Any = None) -> LoopState:
    """Model (weights, freeze cut), feeds (cached or live path), loss, optimiser, schedule; resume if asked."""
    from trainer.model import preprocess_spec_for  # noqa: PLC0415 - lazy: efficientnet_lite_pytorch, torchvision

    t_launch, started_at = time.perf_counter(), time.time()
    lc = LoopConfig.coerce(loop_config)
    cfg = lc.train_config
    rank, world = _dist_info()
    device = _init_process(cfg, rank)
    spec = preprocess_spec_for(cfg.model)
    if data is None:
        data = _build_data(cfg, spec, lc, rank)
    model, feeds = _build_model(cfg, data, device, rank, world)
    reporter = make_reporter(lc.report_to, lc.run_dir, cfg.metric, cfg.mode)
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
    if cfg.optim.ema_decay > 0:
        st.ema = Ema(model, cfg.optim.ema_decay)  # after a resume: averaging restarts from the resumed weights
    static.update(lc.static_metrics)  # e.g. the architecture's latency (tuner/device.py)
    static["setup_seconds"] = time.perf_counter() - t_launch
    static["started_at"] = started_at  # unix time: the study's budget ledger places the run by it
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
    from trainer.data import build_data  # noqa: PLC0415 - lazy: torchvision

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
    from trainer.model import create_model  # noqa: PLC0415 - lazy: efficientnet_lite_pytorch, torchvision

    edge = create_model(cfg.model, num_classes=len(data.classes))
    feeds = make_feeds(cfg, edge, data, rank, world)
    if feeds.path == "cached":
        edge.input_cut = edge.cut
    model: torch.nn.Module = edge.to(device)
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
    from trainer.model import count_params, edge_model, model_size_mb  # noqa: PLC0415 - lazy: efficientnet_lite_pytorch, torchvision

    return {
        "params": count_params(module),
        "size_mb": model_size_mb(module),
        "node_id": _node_id(),
        "data_path": feeds.path,
        "data_path_reason": feeds.reason,
        "freeze_cut": edge_model(module).freeze_report.get("cut", 0),
        "freeze_fraction": edge_model(module).freeze_report.get("fraction", 0.0),
        **{f"act_cache_{k}": v for k, v in feeds.cache_stats.items()},
    }


def _resume(st: LoopState) -> None:
    """Continue from the checkpoint Ray restored this run with (weights, optimiser, scheduler, best so far).

    A checkpoint that cannot be continued restarts the run from epoch 1, says why in the log and reports
    ``resume_restarted``, instead of failing every retry: the stand-in the tuner puts where Ray's retention
    deleted the checkpoint its snapshot names (tuner/_ray_compat.fill_deleted_checkpoints), a checkpoint without
    its weights or train state, or one whose files are truncated (a SIGKILL mid-write or mid-delete). Anything else
    still raises: a read error (Ray retries the trial), a schema this version does not know, weights that do not
    fit the model.

    DDP ranks must continue from the same epoch, or they stop running the same steps and the first collective
    waits forever. Each rank reads its own copy (``Reporter.resume_checkpoint``), then the ranks compare the epoch
    they read (:func:`_agree_on_resume`) before any state is applied: unless every rank read the same one, every
    rank restarts from epoch 1 (the weights DDP broadcast from rank 0 at wrap time are still in place). A rank
    with no checkpoint returns before the comparison: Ray hands every rank of a group the same one, or none. An
    error that still raises on one rank leaves the others in the comparison until Ray tears the group down."""
    ckpt: dict[str, Any] | None = None
    state: TrainState | None = None
    reason = ""
    with st.reporter.resume_checkpoint() as resume:
        if resume is None:
            return
        try:
            ckpt, state = _read_resume(resume)
        except _LostCheckpoint as e:
            reason = f"the checkpoint to resume from is gone or incomplete ({e})"
    if st.world > 1:
        lowest, highest = _agree_on_resume(state.epoch if state is not None else -1, st.device)
        if lowest != highest:
            ckpt, state = None, None
            reason = (
                f"the {st.world} DDP ranks read different checkpoints to resume from (epochs {lowest}..{highest}, "
                "-1: unreadable); every rank restarts alike"
            )
    if ckpt is None or state is None:
        log.warning(f"{reason}; restarting this run from epoch 1")
        st.static["resume_restarted"] = reason
        return
    unwrap(st.model).load_state_dict(ckpt["model_state"])
    st.opt.load_state_dict(dict(state.optimizer))
    st.sched.load_state_dict(dict(state.scheduler))
    st.start_epoch, st.best = state.epoch + 1, state.best
    st.best_epoch = state.best_epoch
    st.at_best = dict(state.at_best)
    st.train_seconds_total = state.train_seconds
    st.static.update(state.static)
    st.history = list(ckpt["meta"].get("history", []))
    st.resumed_from_epoch = state.epoch


def _agree_on_resume(epoch: int, device: torch.device) -> tuple[int, int]:
    """The lowest and highest epoch the DDP ranks read to resume from (-1: none readable); all ranks must call it.

    The tensor lives on the process group's device (NCCL reduces CUDA tensors only; gloo CPU ones)."""
    t = torch.tensor([epoch, -epoch], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0]), -int(t[1])


class _LostCheckpoint(Exception):
    """The checkpoint to resume from is a stand-in, lacks a file, or has a truncated one."""


def _read_resume(resume: Path) -> tuple[dict[str, Any], TrainState]:
    if (resume / DELETED_CHECKPOINT_MARKER).is_file():
        raise _LostCheckpoint(f"{resume} stands in for a checkpoint Ray's retention deleted")
    missing = [f for f in (WEIGHTS_FILE, TRAIN_STATE) if not (resume / f).is_file()]
    if missing:
        raise _LostCheckpoint(f"{resume} has no {' or '.join(missing)}")
    # the files are local now (Ray copied them in resume_checkpoint): a read that fails here is a damaged file
    try:
        ckpt = load_checkpoint(resume)  # a schema this version does not know still raises: a real error
    except UnreadableCheckpoint as e:
        if not e.damaged:
            raise  # e.g. a type weights_only loading refuses: a bug to see, not a lost checkpoint
        raise _LostCheckpoint(f"{resume}: {WEIGHTS_FILE} is damaged ({str(e).splitlines()[0]})") from e
    try:
        state = torch.load(resume / TRAIN_STATE, map_location="cpu", weights_only=True)
    except DAMAGED_FILE_ERRORS as e:
        raise _LostCheckpoint(f"{resume}: {TRAIN_STATE} is damaged ({type(e).__name__}: {e})") from e
    return ckpt, TrainState.from_dict(state)  # TrainStateError (a bug to see): a field missing or mistyped


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # noqa: BLE001 - outside Ray
        return "local"
