"""The one training loop, used in-process, as a Ray Train (DDP) worker, and as a Tune trial.

``train_loop(loop_config)`` takes a :class:`trainer.loop_config.LoopConfig` (train config, run dir, reporter,
metrics reported every epoch, deadline, shared data source, whether to load the test split), or its dict form
(what Ray Train hands a worker); ``LoopConfig.coerce`` validates either in one place.

Steps (timm's train script split the same way): :func:`trainer.loop_setup.setup` (model, feeds, optimiser,
resume; its :class:`~trainer.loop_setup.LoopState` is what one run carries from epoch to epoch),
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from edgetune.numeric import confusion_matrix
from trainer.bnstats import recompute_bn_stats
from trainer.checkpoint import save_checkpoint
from trainer.epoch_result import EpochResult
from trainer.evaluate import metrics_from_confusion
from trainer.loop_config import LoopConfig
from trainer.loop_setup import TRAIN_STATE, LoopState, setup
from trainer.metric import CHECKPOINT_SCORE, METRIC_NAMES, METRICS
from trainer.model import edge_model, set_train_mode
from trainer.optim import Schedule
from trainer.train_state import TrainState

#: Test-only failure injection: fail once at this epoch (1-based) unless the marker file exists.
FAIL_AT_ENV, FAIL_MARKER_ENV = "EDGETUNE_FAIL_AT_EPOCH", "EDGETUNE_FAIL_MARKER"
#: Test-only hold: the second and later runs (rank 0) to finish this epoch (1-based; its result and checkpoint
#: already reported) wait there, before the next epoch, until ``<dir>/release`` exists. Each arrival takes a
#: numbered ticket in the directory (``arrived-<k>``, created exclusively, so runs in other processes count
#: too); a held run writes ``holding-<k>``. Lets a test kill a driver while a trial is known to be running.
HOLD_AFTER_ENV, HOLD_DIR_ENV = "EDGETUNE_HOLD_AFTER_EPOCH", "EDGETUNE_HOLD_DIR"


#: Share of the time left that ``fit_epochs_to_deadline`` plans epochs into (the rest absorbs slower epochs).
FIT_MARGIN = 0.92


class InjectedFailure(RuntimeError):
    """Raised by the test-only failure switch."""


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


def _maybe_hold(st: LoopState, epoch: int) -> None:
    """The test-only hold (:data:`HOLD_AFTER_ENV`): the first run to finish ``epoch`` goes on, later ones wait."""
    at, where = os.environ.get(HOLD_AFTER_ENV), os.environ.get(HOLD_DIR_ENV)
    if not (at and where and int(at) == epoch and st.rank == 0):
        return
    d = Path(where)
    d.mkdir(parents=True, exist_ok=True)
    k = 1
    while True:  # the next free ticket, taken atomically (O_EXCL) across processes
        try:
            os.close(os.open(d / f"arrived-{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            k += 1
    if k == 1:
        return
    (d / f"holding-{k}").write_text(f"held after epoch {epoch} (test switch {HOLD_AFTER_ENV})\n")
    while not (d / "release").exists():
        time.sleep(0.2)


# -- the loop, in steps --------------------------------------------------------------------------------------------
def train_one_epoch(st: LoopState, epoch: int, progress: Any = None) -> tuple[dict[str, float], bool]:
    """One pass over the training feed; stops at the first non-finite loss. Returns its figures
    (:data:`trainer.epoch_result.TRAIN_KEYS`) and whether it diverged."""
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
        if st.ema is not None:
            st.ema.update()
        seen += len(y)
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
    totals = torch.tensor([seen, loss_sum, correct, float(diverged)], dtype=torch.float64, device=st.device)
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
    }, bool(totals[3] > 0)


def validate(st: LoopState) -> dict[str, Any]:
    """BatchNorm statistics per ``model.bn_stats`` (recomputed on training images), then the validation split.
    With weight averaging (``optim.ema_decay``) the averaged weights are validated too (their BatchNorm statistics
    always recomputed) and the better on the run's metric is the epoch's result (``weights``; both sets are
    reported as ``raw_val_*`` and ``ema_val_*``)."""
    if st.cfg.model.bn_stats == "recompute":
        st.bn_images = recompute_bn_stats(st.model, st.feeds.bn(), st.device)
    raw = _validate_model(st, st.model)
    st.epoch_weights = "raw"
    if st.ema is None:
        return raw
    recompute_bn_stats(st.ema.module, st.feeds.bn(), st.device)
    ema = _validate_model(st, st.ema.module)
    m = st.metric
    if m.better(ema[m.name], raw[m.name]):
        st.epoch_weights = "ema"
    out = dict(ema if st.epoch_weights == "ema" else raw)
    out.update({f"raw_{k}": v for k, v in raw.items()})
    out.update({f"ema_{k}": v for k, v in ema.items()})
    out["weights"] = st.epoch_weights
    return out


def _validate_model(st: LoopState, model: torch.nn.Module) -> dict[str, Any]:
    val = evaluate_batches(model, st.feeds.val(), st.eval_loss, len(st.data.classes), st.device, st.use_amp)
    recall = [r for r, s in zip(val["recall"], val["support"], strict=True) if s > 0]
    return {
        "val_loss": val["loss"],
        "val_acc": val["accuracy"],
        "val_macro_f1": val["macro_f1"],
        "val_balanced_acc": float(np.mean(recall)) if recall else 0.0,
    }


# -- checkpoint policy: when to stop, which epoch is best (trainer.metric's rule), when to save -------------------
def end_of_epoch(st: LoopState, result: EpochResult, deadline: float | None) -> EpochResult:
    """Best-epoch rule, checkpoint, report; returns the epoch's result as reported (its ``stop_reason`` set when
    the run stops here)."""
    result = _update_best(st, _with_stop_reason(st, result, deadline))
    st.history.append(result.to_dict(with_static=False))
    with tempfile.TemporaryDirectory(prefix="edgetune-ckpt-") as tmp:
        ckpt_dir = _save(st, tmp, result) if _should_save(st, result.stop_reason) else None
        st.reporter.report(result, ckpt_dir)
    return result


def _with_stop_reason(st: LoopState, result: EpochResult, deadline: float | None) -> EpochResult:
    """``diverged`` (the epoch then scores every metric's worst value), ``deadline`` (the next epoch would end
    after it), or "" to go on."""
    if result.diverged:
        return result.with_(stop_reason="diverged", val={n: metric.worst for n, metric in METRICS.items()})
    if deadline is not None and result.epoch < st.cfg.epochs and time.time() + result.epoch_seconds > deadline:
        return result.with_(stop_reason="deadline")
    return result


def _update_best(st: LoopState, result: EpochResult) -> EpochResult:
    """The best-epoch rule of :mod:`trainer.metric` (a diverged epoch never becomes best): the result with
    ``best_<metric>``, ``best_epoch``, ``resumed_from_epoch``, the checkpoint score and the best epoch's
    validation metrics."""
    m, epoch = st.metric, result.epoch
    if result.stop_reason != "diverged" and m.better(result.val[m.name], st.best):
        st.best, st.best_epoch = result.val[m.name], epoch
        st.at_best = {f"{k}_at_best": result.val[k] for k in METRIC_NAMES}
    return result.with_(
        best={
            m.best_key: st.best if st.best is not None else m.worst,
            "best_epoch": st.best_epoch,
            "resumed_from_epoch": st.resumed_from_epoch,  # tells a resume from a restart in the history
            CHECKPOINT_SCORE: epoch if st.best_epoch == epoch else -1,
            **st.at_best,
        }
    )


def _should_save(st: LoopState, stop: str) -> bool:
    """Every epoch gets a checkpoint, written by rank 0, except a diverged one (its weights are not finite)."""
    return st.rank == 0 and stop != "diverged"


def _save(st: LoopState, tmp: str, result: EpochResult) -> Path:
    module = edge_model(st.ema.module if st.ema is not None and st.epoch_weights == "ema" else st.model)
    extra = {
        "dataset": st.data.dataset_name,
        "dataset_hash": st.data.dataset_hash,
        "history": st.history,
        "weights_source": module.weights_source,
        "weights_tag": module.weights_tag,
        "freeze": dict(module.freeze_report),
        "bn_stats": {"method": st.cfg.model.bn_stats, "images": st.bn_images},
        "data_path": st.feeds.path,
    }
    cut = module.input_cut
    module.input_cut = 0  # a checkpoint is always the image -> logits model
    try:
        d = save_checkpoint(
            tmp, module, st.cfg.to_dict(), st.data.classes, st.spec, result.epoch, result.to_dict(), extra=extra
        )
    finally:
        module.input_cut = cut
    torch.save(_train_state(st, result.epoch).to_dict(), Path(tmp) / TRAIN_STATE)
    return d


def _train_state(st: LoopState, epoch: int) -> TrainState:
    """What the checkpoint keeps beside the weights so that a restored run continues (the one writer of
    :class:`trainer.train_state.TrainState`; its reader is :func:`trainer.loop_setup.setup`'s resume)."""
    return TrainState(
        optimizer=st.opt.state_dict(),
        scheduler=st.sched.state_dict(),
        epoch=epoch,
        best=st.best,
        best_epoch=st.best_epoch,
        at_best=st.at_best,
        train_seconds=st.train_seconds_total,
        static=st.static,
    )


def train_loop(loop_config: LoopConfig | dict[str, Any], data: Any = None) -> EpochResult | None:
    """Train per ``loop_config``; returns the last epoch's result (also reported each epoch; None: no epoch ran)."""
    lc = LoopConfig.coerce(loop_config)
    st = setup(lc, data)
    deadline = lc.deadline
    last: EpochResult | None = None
    epoch = st.start_epoch
    while epoch <= st.cfg.epochs:
        result = run_epoch(st, epoch, lc.report_to)
        if epoch == st.start_epoch and lc.fit_to_deadline and deadline and not result.diverged:
            planned = fit_epochs_to_deadline(st, epoch, result.epoch_seconds, deadline)
            result = result.with_(static={**result.static, "epochs_planned": planned})
        last = end_of_epoch(st, result, deadline)
        if last.stop_reason:
            break
        _maybe_inject_failure(epoch)
        _maybe_hold(st, epoch)
        epoch += 1
    return last


def run_epoch(st: LoopState, epoch: int, report_to: str) -> EpochResult:
    """One training epoch and its validation (none after a diverged one), before the checkpoint policy
    (:func:`end_of_epoch`) adds the stop reason and the best-epoch part."""
    t0 = time.perf_counter()
    train, diverged = train_one_epoch(st, epoch, _progress(st, epoch, report_to))
    val = validate(st) if not diverged else {}
    st.train_seconds_total += time.perf_counter() - t0
    return EpochResult(
        epoch=epoch,
        epoch_seconds=time.perf_counter() - t0,
        lr=st.opt.param_groups[-1]["lr"],
        train_seconds=st.train_seconds_total,
        train=train,
        val=val,
        diverged=diverged,
        static=st.static,
    )


def fit_epochs_to_deadline(st: LoopState, epoch: int, epoch_seconds: float, deadline: float) -> int:
    """After the first epoch: shorten the run (``cfg.epochs`` is the most) to the epochs that end before
    ``deadline`` at the measured speed, and stretch the LR schedule over exactly those, so the last epoch
    anneals instead of being cut off mid-schedule (the refit uses this). Single-worker runs only."""
    if st.world > 1:
        return st.cfg.epochs
    # a margin for epochs that run slower than the first (a busy node): the run must end before the deadline
    fit = epoch + int(FIT_MARGIN * max(0.0, deadline - time.time()) // max(epoch_seconds, 1e-6))
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
