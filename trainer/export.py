"""Checkpoint -> validated ONNX bundle (``make export RUN=… OUT=…``).

Steps: rebuild the checkpoint's model, export ONNX (TorchScript exporter, opset 17, dynamic batch,
``input`` -> ``logits``), ``onnx.checker`` full check, parity PyTorch vs ONNX Runtime on the test
split (top-1 agreement must be 100 %), calibration + check images from the training split,
optional INT8 variants with their accuracy delta, and ``bundle.json`` (see :mod:`edgetune.bundle`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune.bundle import (
    MANIFEST,
    QUANTIZATIONS,
    BundleManifest,
    ImageEntry,
    int8_variant_name,
    load_bundle,
    sha256_file,
)
from edgetune.dataclass_cli import HelpFormatter, add_fields, add_version, field_values, opt
from edgetune.errors import BundleError, EdgetuneError
from edgetune.fsutil import atomic_write_text
from edgetune.imagedecode import read_image
from edgetune.logs import setup_cli_logging
from edgetune.numeric import softmax
from edgetune.preprocess import PreprocessSpec
from trainer.checkpoint import resolve_checkpoint_path, versions
from trainer.config import TrainConfig
from trainer.evaluate import predict_arrays

OPSET = 17
INPUT, OUTPUT = "input", "logits"


def export_onnx(model: torch.nn.Module, spec: PreprocessSpec, path: str | Path, opset: int = OPSET) -> Path:
    """Export with a dynamic batch axis; returns the path (single file, no external data)."""
    model.eval()
    dummy = torch.zeros(2, 3, *spec.input_size)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but is the fast, verified path
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=opset,
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            dynamo=False,
        )
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    return Path(path)


def ort_session(path: str | Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only (the exporter leaves harmless unused initialisers)
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_probs(session: Any, x: np.ndarray, batch: int = 64) -> np.ndarray:
    outs = [session.run([OUTPUT], {INPUT: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return softmax(np.concatenate(outs), axis=1)


def eval_arrays(ds: Any, spec: PreprocessSpec, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    n = len(ds) if not limit else min(limit, len(ds))
    raws = [ds.raw(i) for i in range(n)]
    return spec.apply_batch([r[0] for r in raws]), np.array([r[1] for r in raws], dtype=np.int64)


def parity_check(model: torch.nn.Module, session: Any, x: np.ndarray) -> dict[str, Any]:
    p_torch = predict_arrays(model, x).astype(np.float64)
    p_ort = ort_probs(session, x)
    agree = float((p_torch.argmax(1) == p_ort.argmax(1)).mean()) if len(x) else 1.0
    return {
        "top1_agreement": agree,
        "max_abs_prob_diff": float(np.abs(p_torch - p_ort).max()) if len(x) else 0.0,
        "n_images": int(len(x)),
        "reference": "torch eager fp32 vs onnxruntime CPU, test split",
    }


def _save_images(ds: Any, idx: list[int], folder: Path, rel: str) -> list[dict[str, Any]]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for j, i in enumerate(idx):
        img, label = ds.raw(i)
        name = f"{j:03d}.png"
        cv2.imwrite(str(folder / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        out.append({"file": f"{rel}/{name}", "label_index": int(label)})
    return out


def _spread(n: int, k: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, k))}) if n else []


def quantize_onnx(kind: str, fp32: Path, target: Path, calib: np.ndarray) -> Path:
    """ONNX Runtime INT8 quantisation of ``fp32`` into ``target``: ``dynamic`` (weights only) or ``static``
    (QDQ, activations calibrated on ``calib``, a preprocessed [N, 3, H, W] batch)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static

    if kind not in QUANTIZATIONS:
        raise EdgetuneError(f"unknown quantisation {kind!r}; allowed: {', '.join(QUANTIZATIONS)}")
    ort.set_default_logger_severity(3)  # the quantiser's sessions warn about each unused initialiser
    if kind == "dynamic":
        quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8)
    else:

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter([{INPUT: calib[i : i + 1]} for i in range(len(calib))])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.it, None)

        quantize_static(str(fp32), str(target), Reader(), activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return target


def quantize_variant(
    kind: str,
    fp32: Path,
    out: Path,
    calib: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    base_acc: float,
    tolerance: float,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
) -> dict[str, Any]:
    """An INT8 variant (:func:`quantize_onnx`), accepted or refused on the VALIDATION split (refused when it
    loses more than ``tolerance`` validation accuracy against the float model). The test accuracy of a kept
    variant is recorded for information only."""
    target = quantize_onnx(kind, fp32, out / f"model.{int8_variant_name(kind)}.onnx", calib)
    session = ort_session(target)
    acc = float((ort_probs(session, x_val).argmax(1) == y_val).mean()) if len(y_val) else 0.0
    info: dict[str, Any] = {
        "file": target.name,
        "sha256": sha256_file(target),
        "precision": "int8",
        "method": kind,
        "val_accuracy": acc,
        "accuracy_delta": acc - base_acc,
        "decided_on": "val",
        "size_mb": target.stat().st_size / 1e6,
    }
    if base_acc - acc > tolerance:
        target.unlink()
        info["refused"] = f"loses {base_acc - acc:.4f} validation accuracy > tolerance {tolerance}"
    elif x_test is not None and y_test is not None and len(y_test):
        info["test_accuracy"] = float((ort_probs(session, x_test).argmax(1) == y_test).mean())
    return info


def resolve_run(run: str | Path) -> tuple[Path, dict[str, Any]]:
    """A tune OUT dir, a train run dir or a checkpoint dir -> (checkpoint file, run info from metrics.json)."""
    p = Path(run)
    ckpt = resolve_checkpoint_path(p)
    info: dict[str, Any] = {}
    for m in (ckpt.parent / "metrics.json", p / "best" / "metrics.json", p / "metrics.json"):
        if m.is_file():
            info = json.loads(m.read_text())
            break
    return ckpt, info


def export_bundle(
    run: str | Path,
    out_dir: str | Path,
    data: Any = None,
    quantize: tuple[str, ...] = (),
    tolerance: float = 0.01,
    n_calib: int = 32,
    n_check: int = 16,
    source: Any = None,
    target_latency: Callable[[str], dict[str, Any] | None] | None = None,
    precision: str = "fp32",
) -> Path:
    """Export ``run``'s best checkpoint as a bundle in ``out_dir``; returns ``out_dir``.

    Device-in-the-loop search: ``precision`` is the precision the search picked for the device; ``int8`` adds
    the static INT8 variant to ``quantize``, and if the tolerance refuses it the bundle records that it deploys
    at fp32 instead (``extra.deploy_precision``). ``target_latency(deployed precision)``: the latency measured on
    the target device for that precision, with the target's name and identity (recorded in the bundle)."""
    from trainer.model import model_from_checkpoint  # noqa: PLC0415 - lazy: efficientnet_lite_pytorch, torchvision

    ckpt, info = resolve_run(run)
    model, meta = model_from_checkpoint(ckpt)
    return export_model(
        model,
        meta,
        out_dir,
        data=data,
        quantize=quantize,
        tolerance=tolerance,
        n_calib=n_calib,
        n_check=n_check,
        source=source,
        target_latency=target_latency,
        precision=precision,
        origin={"run": str(Path(run).resolve()), "checkpoint": str(ckpt.resolve()), "info": info},
    )


def export_model(
    model: torch.nn.Module,
    meta: dict[str, Any],
    out_dir: str | Path,
    data: Any = None,
    quantize: tuple[str, ...] = (),
    tolerance: float = 0.01,
    n_calib: int = 32,
    n_check: int = 16,
    source: Any = None,
    target_latency: Callable[[str], dict[str, Any] | None] | None = None,
    precision: str = "fp32",
    origin: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Export an image -> logits ``model`` described by checkpoint-style ``meta`` (config, classes, preprocess,
    backbone, metrics) as a bundle in ``out_dir``: :func:`export_bundle`'s work once the model is built. A study's
    final model that is an ensemble (members, test-time views and decision rule in one graph, tuner.posthoc) is
    exported through here with its description in ``extra``."""
    t0 = time.perf_counter()
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    cfg = TrainConfig.from_dict(meta["config"])
    out = Path(out_dir)
    tmp = _fresh_partial_dir(out)
    onnx_path = export_onnx(model, spec, tmp / "model.onnx")
    session = ort_session(onnx_path)
    data = _checked_data(data, meta, cfg, spec, source)
    x_test, y_test = eval_arrays(data.test, spec)
    parity = _parity_gate(model, session, x_test)
    calib, check = _bundle_images(data, spec, session, tmp, n_calib, n_check)
    fp32_acc = float((ort_probs(session, x_test).argmax(1) == y_test).mean()) if len(y_test) else 0.0
    if precision == "int8" and QUANTIZATIONS[0] not in quantize:
        quantize = (*quantize, QUANTIZATIONS[0])
    variants, refused = _int8_variants(quantize, data, spec, session, onnx_path, tmp, calib, tolerance, x_test, y_test)
    deploy = _deploy_precision(precision, variants, refused)
    if extra and "final_model" in extra:  # a post-hoc model (members x views): its cost on this CPU, recorded
        extra = {**extra, "final_model": {**extra["final_model"], "latency_here": cpu_latency(onnx_path, spec)}}
    latency = target_latency(deploy["deployed"]) if target_latency else None
    manifest = _manifest(
        meta,
        spec,
        onnx_path,
        parity,
        calib,
        check,
        variants,
        extra={
            "opset": OPSET,
            "onnx_test_accuracy": fp32_acc,
            # the training split's class counts: the edge server's drift signal compares its predictions to them
            "train_class_counts": [int(c) for c in getattr(data, "class_counts", None) or []],
            **_provenance(meta, origin),
            "refused_variants": refused,
            "export_seconds": round(time.perf_counter() - t0, 3),
            "deploy_precision": deploy,
            **({"target_latency": latency} if latency else {}),
            **(extra or {}),
        },
    )
    return _publish(tmp, out, manifest)


def _checked_data(data: Any, meta: dict[str, Any], cfg: TrainConfig, spec: PreprocessSpec, source: Any) -> Any:
    """The data the bundle is checked and calibrated on (the checkpoint's dataset unless given): its classes must
    be the checkpoint's (BundleError)."""
    from trainer.data import build_data  # noqa: PLC0415 - lazy: torchvision

    if data is None:
        data = build_data(cfg.data, spec, run_dir=None, seed=cfg.seed, source=source)
    if list(data.classes) != list(meta["classes"]):
        raise BundleError(f"dataset classes {data.classes} differ from the checkpoint's {meta['classes']}")
    return data


def _parity_gate(model: torch.nn.Module, session: Any, x_test: np.ndarray) -> dict[str, Any]:
    """PyTorch vs ONNX Runtime on the test images: every top-1 must agree, else no bundle (BundleError)."""
    parity = parity_check(model, session, x_test)
    if parity["top1_agreement"] < 1.0:
        raise BundleError(
            f"ONNX parity failed: top-1 agreement {parity['top1_agreement']:.4f} < 1.0 "
            f"(max |Δp| {parity['max_abs_prob_diff']:.2e}); bundle not written"
        )
    return parity


def _publish(tmp: Path, out: Path, manifest: dict[str, Any]) -> Path:
    """The manifest written, the bundle validated as the server will load it, then moved to ``out`` (replacing
    an earlier one)."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    load_bundle(tmp)  # validate what we wrote
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _manifest(
    meta: dict[str, Any],
    spec: PreprocessSpec,
    onnx_path: Path,
    parity: dict[str, Any],
    calib: list[dict[str, Any]],
    check: list[dict[str, Any]],
    variants: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The bundle's ``bundle.json`` (edgetune.bundle.BundleManifest, its one writer) as a dict."""
    return BundleManifest(
        model_file="model.onnx",
        onnx_sha256=sha256_file(onnx_path),
        labels=tuple(meta["classes"]),
        preprocess=spec,
        input={"name": INPUT, "shape": ["batch", 3, *spec.input_size], "dtype": "float32"},
        output={"name": OUTPUT, "shape": ["batch", len(meta["classes"])], "kind": "logits"},
        backbone=meta["backbone"],
        parity=parity,
        versions={**versions(), **_onnx_versions(), "checkpoint": meta.get("versions", {})},
        calibration_images=tuple(ImageEntry(**c) for c in calib),
        check_images=tuple(ImageEntry(**c) for c in check),
        variants=variants,
        weights={"weights_tag": meta.get("weights_tag", ""), "source": meta.get("weights_source", "")},
        freeze=meta.get("freeze") or {},
        extra=extra,
    ).to_dict()


def _fresh_partial_dir(out: Path) -> Path:
    """An empty ``<out>.partial`` next to ``out``: the bundle is written there and renamed into place when valid."""
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _bundle_images(
    data: Any, spec: PreprocessSpec, session: Any, tmp: Path, n_calib: int, n_check: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The calibration and check images (spread over the training split) saved in the bundle; each check image
    carries the ONNX model's top-1 on it (what the edge's accuracy check compares against)."""
    calib = _save_images(data.train_eval, _spread(len(data.train_eval), n_calib), tmp / "calib", "calib")
    check = _save_images(data.train_eval, _spread(len(data.train_eval), n_check)[::-1], tmp / "check", "check")
    x_check = spec.apply_batch([read_image(tmp / c["file"]) for c in check])
    check_top1 = ort_probs(session, x_check).argmax(1)
    for c, t in zip(check, check_top1, strict=True):
        c["onnx_top1"] = int(t)
    return calib, check


def _int8_variants(
    quantize: tuple[str, ...],
    data: Any,
    spec: PreprocessSpec,
    session: Any,
    onnx_path: Path,
    tmp: Path,
    calib: list[dict[str, Any]],
    tolerance: float,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kept, refused) INT8 variants by name, each decided on validation accuracy against the fp32 model's."""
    variants: dict[str, Any] = {}
    refused: dict[str, Any] = {}
    if not quantize:
        return variants, refused
    x_cal = spec.apply_batch([read_image(tmp / c["file"]) for c in calib])
    x_val, y_val = eval_arrays(data.val, spec)
    val_acc = float((ort_probs(session, x_val).argmax(1) == y_val).mean()) if len(y_val) else 0.0
    for kind in quantize:
        v = quantize_variant(kind, onnx_path, tmp, x_cal, x_val, y_val, val_acc, tolerance, x_test, y_test)
        (refused if "refused" in v else variants)[int8_variant_name(kind)] = v
    return variants, refused


def _provenance(meta: dict[str, Any], origin: dict[str, Any] | None) -> dict[str, Any]:
    """The bundle's ``metrics`` (validation from the checkpoint, test from the run's metrics.json: ``origin``'s
    ``info``) and ``source`` (``origin``'s run and checkpoint; epoch, study, trial, dataset)."""
    origin = dict(origin or {})
    info = origin.pop("info", {}) or {}
    return {
        "metrics": {
            "val": {k: v for k, v in meta["metrics"].items() if k.startswith("val_")},
            "test": {k: info[k] for k in ("test_accuracy", "test_macro_f1") if k in info},
        },
        "source": {
            **origin,
            "epoch": meta["epoch"],
            "study": info.get("study"),
            "trial_id": info.get("trial_id"),
            "dataset": meta.get("dataset"),
            "dataset_hash": meta.get("dataset_hash"),
        },
    }


def time_onnx(path: str | Path, input_size: tuple[int, int], warmup: int, runs: int, threads: int = 1) -> list[float]:
    """Per-run batch-1 latencies (ms) of an ONNX file in ONNX Runtime on this CPU, after ``warmup`` untimed runs."""
    sess = ort_session(path, threads=threads)
    x = np.zeros((1, 3, *input_size), dtype=np.float32)
    for _ in range(warmup):
        sess.run([OUTPUT], {INPUT: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run([OUTPUT], {INPUT: x})
        times.append((time.perf_counter() - t) * 1e3)
    return times


def cpu_latency(onnx_path: Path, spec: PreprocessSpec, warmup: int = 5, runs: int = 20) -> dict[str, Any]:
    """Batch-1, 1-thread ONNX Runtime latency on the exporting machine (p50/p90 ms): what one camera stream costs
    on a CPU; a target device's own figure comes from the latency service (bundle ``target_latency``)."""
    times = time_onnx(onnx_path, spec.input_size, warmup, runs)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p90_ms": round(float(np.percentile(times, 90)), 3),
        "backend": "onnxruntime CPU, 1 thread, batch 1",
        "runs": runs,
    }


def _deploy_precision(searched: str, variants: dict[str, Any], refused: dict[str, Any]) -> dict[str, Any]:
    """What the bundle deploys at: the searched precision, or fp32 where its INT8 variant was refused."""
    name = int8_variant_name(QUANTIZATIONS[0])
    if searched == "int8" and name not in variants:
        why = (refused.get(name) or {}).get("refused", "no INT8 variant")
        return {"searched": searched, "deployed": "fp32", "why": f"{name} refused: {why}"}
    return {"searched": searched, "deployed": searched}


#: Synthetic calibration images in a timing bundle at precision int8 (the untrained copy has no data of its own).
TIMING_CALIBRATION_IMAGES = 8


def write_architecture_bundle(
    model: torch.nn.Module,
    spec: PreprocessSpec,
    num_classes: int,
    out_dir: str | Path,
    backbone: str,
    precision: str = "fp32",
) -> Path:
    """A bundle of an (untrained) architecture, for timing it on a device: the same ONNX export and
    ``bundle.json`` schema as :func:`export_bundle`, with no parity, images or metrics (latency depends on the
    architecture, not the weights). Marked ``purpose: timing`` so it is never mistaken for a model to serve.

    ``precision="int8"``: also :data:`TIMING_CALIBRATION_IMAGES` synthetic calibration images (seeded noise, as
    ``trtexec --int8`` times without real data: the scales change, the engine's layers and kernels do not), for a
    TensorRT INT8 engine built on the device, and the static INT8 variant calibrated on them, for ONNX Runtime.
    The deployed model is quantised on its real calibration images at export (``export_bundle(quantize=…)``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model.cpu().eval(), spec, out / "model.onnx")
    calib: list[dict[str, Any]] = []
    variants: dict[str, Any] = {}
    if precision == "int8":
        import cv2

        (out / "calib").mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        h, w = spec.input_size
        for j in range(TIMING_CALIBRATION_IMAGES):
            name = f"calib/{j:03d}.png"
            cv2.imwrite(str(out / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            calib.append({"file": name, "label_index": 0})
        x_cal = spec.apply_batch([read_image(out / c["file"]) for c in calib])
        kind = QUANTIZATIONS[0]
        q = quantize_onnx(kind, onnx_path, out / f"model.{int8_variant_name(kind)}.onnx", x_cal)
        variants[int8_variant_name(kind)] = {
            "file": q.name,
            "sha256": sha256_file(q),
            "precision": "int8",
            "method": kind,
            "calibration": "synthetic (timing only)",
        }
    manifest = BundleManifest(
        model_file="model.onnx",
        onnx_sha256=sha256_file(onnx_path),
        labels=tuple(f"class_{i}" for i in range(num_classes)),
        preprocess=spec,
        input={"name": INPUT, "shape": ["batch", 3, *spec.input_size], "dtype": "float32"},
        output={"name": OUTPUT, "shape": ["batch", num_classes], "kind": "logits"},
        backbone=backbone,
        parity={"skipped": "untrained architecture, exported for timing only"},
        versions={**versions(), **_onnx_versions()},
        calibration_images=tuple(ImageEntry(**c) for c in calib),
        variants=variants,
        extra={"opset": OPSET, "purpose": "timing", "timing_precision": precision},
    ).to_dict()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    load_bundle(out)
    return out


def record_parent(bundle_dir: str | Path, parent: dict[str, Any]) -> None:
    """Record in an exported bundle the bundle it was retrained from (``extra.parent``: its SHA-256, model version,
    path, study); the manifest is read, validated and written back through :class:`BundleManifest`."""

    path = Path(bundle_dir) / MANIFEST
    manifest = BundleManifest.from_dict(json.loads(path.read_text()), str(path))
    updated = dataclasses.replace(manifest, extra={**manifest.extra, "parent": dict(parent)})
    atomic_write_text(path, json.dumps(updated.to_dict(), indent=2))
    load_bundle(bundle_dir)


def bundle_files(bundle_dir: str | Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of a bundle directory (what a timing task on another node receives)."""
    root = Path(bundle_dir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _onnx_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """``python -m trainer.export``'s options; its flags are derived from these fields (edgetune.dataclass_cli)."""

    run: str = opt(help="tune OUT dir, train run dir or checkpoint dir")
    out: str | None = opt(None, "bundle directory (default <run>/bundle)")
    quantize: tuple[str, ...] = opt((), f"comma list of INT8 variants: {', '.join(QUANTIZATIONS)}")
    tolerance: float = opt(0.01, "max validation-accuracy loss of an INT8 variant")

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantize", tuple(self.quantize))

    @property
    def bundle_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.run) / "bundle"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__, formatter_class=HelpFormatter)
    add_fields(p, ExportOptions)
    add_version(p)
    return p


def main(argv: list[str] | None = None) -> int:
    opts = ExportOptions(**field_values(build_parser().parse_args(argv), ExportOptions))
    setup_cli_logging(verbose=False)
    try:
        b = export_bundle(opts.run, opts.bundle_dir, quantize=opts.quantize, tolerance=opts.tolerance)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((b / MANIFEST).read_text())
    par = meta["parity"]
    print(
        f"bundle {b}: {meta['backbone']} labels={meta['labels']} parity top-1 {par['top1_agreement']:.3f} "
        f"max|Δp| {par['max_abs_prob_diff']:.2e} on {par['n_images']} test images"
    )
    for name, v in {**meta["variants"], **meta["refused_variants"]}.items():
        print(f"  {name}: val acc {v['val_accuracy']:.4f} (Δ {v['accuracy_delta']:+.4f}) {v.get('refused', 'kept')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
