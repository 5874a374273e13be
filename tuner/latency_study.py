"""The device-in-the-loop glue of a study (tuner/run.py): the latency setup before the search (the target's
precisions join the space; the study's latency service), the searcher's latency rejector, the latency outputs after
it, and the hand-off: the winner exported with its latency record and, with a target, timed itself on the device.
The pieces it uses have their own modules: tuner/device.py, tuner/latency_service.py, tuner/latency_report.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetune.bundle import load_bundle
from trainer.config import TrainConfig
from tuner import device, latency_service
from tuner.device import LatencyRejector
from tuner.latency_report import write_latency_outputs, write_storage_latency_table
from tuner.options import TuneOptions
from tuner.storage import rdb_storage
from tuner.summary import StudySummary

if TYPE_CHECKING:
    import optuna

    from trainer.data import PreparedSource
    from tuner.device import LatencySetup
    from tuner.posthoc import PosthocResult
    from tuner.space import SearchSpace


log = logging.getLogger(__name__)


def latency_setup(opts: TuneOptions, space: SearchSpace) -> Any:
    """Device in the loop (tuner/device.py): check the target's nodes, ask which precisions it supports (they join
    the space, with the input size), start the study's latency service. Needs Ray connected."""
    protocol = opts.timing_protocol.to_dict()
    target = opts.target or None
    if target:
        nodes = device.require_target(target)
        caps = device.device_capabilities(target, opts.timing_backend)
        log.info(
            f"target {target}: {len(nodes)} live node(s) ({', '.join(n[:12] for n in nodes)}); device "
            f"{caps['device'].get('gpu_name') or caps['device'].get('cpu')} ({caps['device'].get('backend')}); "
            f"precisions {caps['precisions']}"
        )
        space.add_device_params(
            device.search_precisions(caps["precisions"], opts.precisions, target), img_fixed=bool(opts.img)
        )
    else:
        log.info(
            "no --target: latency is an estimate timed on the driver's node (alongside training), "
            "not a device's latency"
        )
    device.LatencyCache(_rdb(opts.storage))  # create the cache study before the service and trials use it
    service = latency_service.start_service(
        opts.study, opts.storage, target, protocol, opts.timing_backend, opts.timing_timeout_s
    )
    return device.LatencySetup(
        study=opts.study,
        target=target,
        service=service,
        max_latency_ms=opts.max_latency_ms,
        precision_param="precision" if "precision" in space.params else "",
    )


def _rdb(url: str) -> Any:
    return rdb_storage(url)


def rejector(
    opts: TuneOptions, base: TrainConfig, space: SearchSpace, source: PreparedSource, latency: LatencySetup | None
) -> LatencyRejector | None:
    """For the searcher: rejects a sampled configuration whose architecture is already known to be slower than
    ``--max-latency-ms`` on the target (None without a constraint)."""
    if latency is None or opts.max_latency_ms <= 0:
        return None

    return LatencyRejector(base=base, space=space, num_classes=len(source.classes), storage=opts.storage, setup=latency)


def latency_outputs(opts: TuneOptions, study: optuna.Study, out: Path) -> dict[str, Any]:
    records = device.LatencyCache(_rdb(opts.storage)).records(device.cache_target(opts.target or None))
    res: dict[str, Any] = write_latency_outputs(study, records, out, opts.metric, opts.max_latency_ms)
    shared = write_storage_latency_table(opts.storage, records, opts.metric, device.CACHE_STUDY, out)
    if shared is not None:
        res["storage_latency_table"] = str(shared)
    return res


def _winner_latency(
    opts: TuneOptions, summary: StudySummary, precision: str, setup: Any = None
) -> dict[str, Any] | None:
    """What the bundle records of the winner's latency: its architecture's timing at the precision the bundle
    deploys at (target, device, p50/p90). An architecture not timed at that precision (a winner searched at int8
    whose INT8 variant the export refused deploys at fp32) is timed now through the study's latency service
    (``setup``); None where it cannot be."""
    if not opts.latency_on or summary.final is None:
        return None
    from trainer.checkpoint import read_meta  # noqa: PLC0415 - lazy: torch

    meta = read_meta(Path(summary.final.checkpoint))
    cfg = TrainConfig.from_dict(meta["config"])
    sig = device.signature_for(cfg, len(meta["classes"]), precision)
    rec = device.LatencyCache(_rdb(opts.storage)).get(device.cache_target(opts.target or None), sig)
    if rec is None and setup is not None:
        answer = device.get_latency(setup, cfg, len(meta["classes"]), precision)
        rec = answer.get("record") if answer["status"] != "unavailable" else None
    if rec is None:
        return None
    return {
        "target": opts.target or None,
        "kind": rec.get("kind"),
        "architecture": sig.label,
        "p50_ms": rec["p50_ms"],
        "p90_ms": rec["p90_ms"],
        "precision": precision,
        "node_id": rec.get("node_id"),
        "device": rec.get("device", {}),
        "protocol": rec.get("protocol", {}),
        "backend": rec.get("backend"),
    }


def _time_winner(opts: TuneOptions, bundle_dir: Path, precision: str) -> dict[str, Any]:
    """Time the exported bundle itself on the target, at the precision the search picked (with TensorRT this builds
    its engine there and keeps it in the device's engine cache, for ``make engine PRECISION=<it>`` to reuse)."""
    import ray

    from trainer.export import bundle_files  # noqa: PLC0415 - lazy: torch

    ref = (
        ray.remote(device.time_on_node)
        .options(**device.task_options(opts.target))
        .remote(bundle_files(bundle_dir), precision, opts.timing_protocol.to_dict(), opts.timing_backend, True)
    )
    try:
        rec: dict[str, Any] = ray.get(ref, timeout=opts.timing_timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:
        ray.cancel(ref, force=True)
        return {"status": f"unavailable: {type(e).__name__}", "precision": precision}
    return {
        "status": "timed",
        "p50_ms": rec["p50_ms"],
        "p90_ms": rec["p90_ms"],
        "node_id": rec["node_id"],
        "onnx_sha256": rec["onnx_sha256"],
        "engine": rec.get("engine"),
        "precision": precision,
    }


def hand_off(
    opts: TuneOptions,
    summary: StudySummary,
    out: Path,
    source: PreparedSource,
    latency: LatencySetup | None = None,
    final: PosthocResult | None = None,
) -> StudySummary:
    """Export the winner (``<out>/bundle``, at the precision the search picked, with its architecture's latency
    record) and, with a target, time the bundle's own ONNX on the device (and keep its engine there). Returns the
    summary with its ``bundle`` and, with a target, the latency's ``winner``. ``latency``: the study's
    LatencySetup (times the architecture at the deployed precision if the search never did)."""
    from trainer.checkpoint import read_meta  # noqa: PLC0415 - lazy: torch
    from trainer.export import export_bundle, export_model  # noqa: PLC0415 - lazy: torch

    searched = str((summary.final.params if summary.final else {}).get("precision", "fp32"))
    timing = lambda p: _winner_latency(opts, summary, p, latency)  # noqa: E731
    if final is not None and (final.tta or final.ensemble or final.tau):
        # the post-hoc model (tuner/posthoc.py): members, views and decision rule exported as one graph
        b = export_model(
            final.model,
            read_meta(out / "best"),
            out / "bundle",
            source=source,
            precision=searched,
            tolerance=opts.int8_tolerance,
            target_latency=timing,
            origin={
                "run": str(out),
                "checkpoint": str(out / "best"),
                "info": json.loads((out / "best" / "metrics.json").read_text()),
            },
            extra={"final_model": final.describe()},
        )
    else:
        b = export_bundle(
            out, out / "bundle", source=source, precision=searched, tolerance=opts.int8_tolerance, target_latency=timing
        )
    meta = load_bundle(b).meta
    deploy = dict(meta["deploy_precision"])
    if deploy["deployed"] != searched:
        p50 = (meta.get("target_latency") or {}).get("p50_ms")
        log.warning(
            f"the search picked {searched} but the bundle deploys at {deploy['deployed']}: {deploy['why']}; "
            f"{deploy['deployed']} p50 {f'{p50:.2f} ms' if p50 is not None else 'not measured'}"
        )
        if p50 is not None and 0 < opts.max_latency_ms < p50:
            deploy["breaks_max_latency"] = True
            log.warning(
                f"at {deploy['deployed']} the winner breaks --max-latency-ms {opts.max_latency_ms:g} "
                f"(p50 {p50:.2f} ms): pick another trial from the Pareto table, or raise --int8-tolerance"
            )
    if not opts.target:
        return summary.with_(bundle=str(b))
    # hand-off: the winner's own ONNX timed on the device (and its engine kept there)
    winner = {**_time_winner(opts, b, deploy["deployed"]), "deploy": deploy}
    return summary.with_(bundle=str(b), latency={**(summary.latency or {}), "winner": winner})
