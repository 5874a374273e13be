"""Shared helpers of the benchmarks: budget flag, machine info, Markdown tables, JSON results,
percentiles, a real exported bundle and a real edge server subprocess on 127.0.0.1."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = ("small", "large")

if str(ROOT) not in sys.path:  # scripts run as `python bench/bench_x.py` from the repo root
    sys.path.insert(0, str(ROOT))

from edge_server.agent.timing import cpu_model  # noqa: E402
from edgetune.errors import ConfigError  # noqa: E402
from edgetune.fsutil import atomic_write_text  # noqa: E402
from edgetune.markdown import markdown_table  # noqa: E402


def parse_args(
    description: str,
    argv: Sequence[str] | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The flags every benchmark has (--budget, --out, --work), plus the ones ``add_args`` adds."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--budget", default="small", help=f"one of {list(BUDGETS)} (small: the `make bench` default)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON results")
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    if add_args is not None:
        add_args(p)
    args = p.parse_args(argv)
    if args.budget not in BUDGETS:
        raise ConfigError(f"--budget must be one of {list(BUDGETS)}, got {args.budget!r}")
    return args


def work_dir(args: argparse.Namespace, prefix: str) -> Path:
    """``--work`` when given (kept), else a temporary folder removed when the script exits."""
    if args.work:
        p = Path(args.work).resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p
    import atexit
    import shutil
    import tempfile

    p = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
    atexit.register(shutil.rmtree, p, True)
    return p


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    for mod in ("torch", "onnxruntime", "ray", "optuna", "grpc", "cv2", "numpy"):
        try:
            info[f"{mod}_version"] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional package missing: record that
            info[f"{mod}_version"] = None
    return info


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def md_table(rows: Sequence[dict[str, Any]], cols: Sequence[str], digits: int = 3) -> str:
    """A Markdown table of ``rows`` (dicts) with the given columns; missing values print as –."""
    return markdown_table(rows, cols, lambda v: fmt(v, digits))


def write_results(
    name: str, payload: dict[str, Any], out_dir: str | Path = RESULTS, tables: dict[str, str] | None = None
) -> Path:
    """Write ``<out_dir>/<name>.json`` (payload + machine info + tables) and print the tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "machine": machine_info(), **payload}
    if tables:
        doc["tables_md"] = tables
        for title, t in tables.items():
            print(f"\n### {title}\n\n{t}\n")
    path = out / f"{name}.json"
    atomic_write_text(path, json.dumps(doc, indent=2, default=str))
    print(f"bench: wrote {path}")
    return path


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0


# -- a real bundle and a real server -----------------------------------------------------------
def build_bundle(out_dir: str | Path, backbone: str = "mobilenet_v2", img: int = 224, weights: str = "none") -> Path:
    """Train ``backbone`` for one epoch on a few texture photos (head only) and export it with the trainer's
    exporter; ``weights="none"`` starts from random init on purpose (speed measurements only)."""
    import tempfile

    from trainer.config import TrainConfig
    from trainer.export import export_bundle
    from trainer.run import run_training

    cfg = TrainConfig.from_dict(
        {
            "data": {"dataset": "textures", "max_images": 30},
            "model": {"backbone": backbone, "weights": weights, "img_size": img, "freeze": 1.0},
            "epochs": 1,
            "batch_size": 16,
            "progress": False,
            "robustness": False,
        }
    )
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-run-") as run:
        run_training(cfg, run)
        return export_bundle(run, out_dir)


def build_bundle_subprocess(out_dir: str | Path, backbone: str = "mobilenet_v2", img: int = 224) -> Path:
    """``build_bundle`` in a child process, so that torch's threads never live in the measuring process."""
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--build-bundle", str(out_dir), backbone, str(img)],
        cwd=ROOT,
        check=True,
    )
    return Path(out_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m edge_server`` as a subprocess on 127.0.0.1 (stopped by its own handle)."""

    def __init__(
        self, bundle: Path, threads: int = 2, max_batch: int = 8, max_wait_ms: float = 2.0, extra: Sequence[str] = ()
    ) -> None:
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "edge_server",
            "--bundle",
            str(bundle),
            "--port",
            str(self.port),
            "--backend",
            "onnxruntime",
            "--threads",
            str(threads),
            "--max-batch",
            str(max_batch),
            "--max-wait-ms",
            str(max_wait_ms),
            "--log-level",
            "warning",
            *extra,
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        self.address = f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        import grpc

        from edgetune.v1 import classifier_pb2 as pb
        from edgetune.v1 import classifier_pb2_grpc as pbg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge server exited with code {self.proc.returncode}")
            try:
                with grpc.insecure_channel(self.address) as ch:
                    pbg.ClassifierStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=2.0)
                return
            except grpc.RpcError:
                time.sleep(0.3)
        raise RuntimeError(f"edge server on {self.address} not ready after {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> ServerProcess:
        self.wait_ready()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def test_jpeg(max_side: int = 512, quality: int = 90) -> bytes:
    """A real photo (scikit-image astronaut, colour) as JPEG bytes."""
    import cv2
    from skimage import data

    rgb = data.astronaut()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if max(bgr.shape[:2]) != max_side:
        s = max_side / max(bgr.shape[:2])
        bgr = cv2.resize(bgr, (round(bgr.shape[1] * s), round(bgr.shape[0] * s)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


test_jpeg.__test__ = False  # type: ignore[attr-defined]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--build-bundle":
        build_bundle(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit("usage: common.py --build-bundle OUT_DIR BACKBONE IMG")
