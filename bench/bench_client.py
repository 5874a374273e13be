"""Client bandwidth/latency: bytes per frame and end-to-end latency vs frame size (max side) and JPEG
quality, through the client's own ``encode_frame`` and a real edge server (subprocess on 127.0.0.1).

End-to-end = ``encode_frame`` of the captured BGR frame + one StreamClassify round trip (send -> result).
Writes bench/results/client.json."""

from __future__ import annotations

import queue
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ServerProcess, build_bundle_subprocess, md_table, parse_args, percentile, work_dir, write_results  # noqa: E402

BUDGET = {
    "small": {"sizes": [0, 640, 320, 224], "qualities": [50, 75, 90, 95], "frames": 12, "rounds": 2},
    "large": {"sizes": [0, 1280, 640, 480, 320, 224], "qualities": [30, 50, 75, 85, 90, 95], "frames": 40, "rounds": 3},
}
FRAME_SIZE = (1280, 960)  # the "captured" camera frame (w, h): a real photo upscaled to a camera-like size


def camera_frame() -> np.ndarray:
    import cv2
    from skimage import data

    bgr = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    return cv2.resize(bgr, FRAME_SIZE, interpolation=cv2.INTER_CUBIC)


def measure(address: str, frame: np.ndarray, max_size: int, quality: int, n: int) -> dict[str, Any]:
    import grpc

    from edge_client.frames import EncodeOptions, encode_frame
    from edgetune.v1 import classifier_pb2 as pb
    from edgetune.v1 import classifier_pb2_grpc as pbg

    opts = EncodeOptions(max_size=max_size, jpeg_quality=quality)
    q: queue.Queue[Any] = queue.Queue()

    def gen() -> Any:
        while (item := q.get()) is not None:
            yield item

    sizes, enc_ms, rtt_ms, e2e_ms, server_ms, labels = [], [], [], [], [], []
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        responses = pbg.ClassifierStub(ch).StreamClassify(gen())
        for i in range(n):
            t0 = time.perf_counter()
            data, small = encode_frame(frame, opts)
            t1 = time.perf_counter()
            q.put(
                pb.Frame(camera_id="bench", frame_id=i + 1, capture_time_us=time.time_ns() // 1000, image=data, top_k=1)
            )
            r = next(responses)
            t2 = time.perf_counter()
            if r.error:
                raise RuntimeError(f"server error: {r.error}")
            sizes.append(len(data))
            enc_ms.append((t1 - t0) * 1e3)
            rtt_ms.append((t2 - t1) * 1e3)
            e2e_ms.append((t2 - t0) * 1e3)
            server_ms.append(r.timing.total_us / 1e3)
            labels.append(r.predictions[0].label)
        q.put(None)
        for _ in responses:
            pass
    return {
        "max_size": max_size,
        "jpeg_quality": quality,
        "sent_wh": [int(small.shape[1]), int(small.shape[0])],
        "bytes": sizes,
        "encode_ms": enc_ms,
        "rtt_ms": rtt_ms,
        "e2e_ms": e2e_ms,
        "server_ms": server_ms,
        "labels": labels,
    }


COLUMNS = [
    "max_size",
    "jpeg_quality",
    "sent_w x h",
    "kB_per_frame",
    "Mbit_s_at_30fps",
    "encode_ms_p50",
    "rtt_ms_p50",
    "server_ms_p50",
    "e2e_ms_p50",
    "e2e_ms_p99",
    "same_top1_as_full_frame_top_q",
]
SETUP = {
    "frame": f"scikit-image astronaut upscaled to {FRAME_SIZE[0]}x{FRAME_SIZE[1]} BGR",
    "model": "mobilenet_v2 224 px (weights=none, speed only)",
    "server": "python -m edge_server subprocess, onnxruntime, 2 threads, max_batch 8",
    "path": "edge_client.frames.encode_frame -> pb.Frame -> StreamClassify (closed loop, 1 stream)",
    "note": "top1 agreement compares the untrained model's label across settings (a sanity check that "
    "downscaling/quality does not change what the server sees, not an accuracy claim)",
}


def run_rounds(bundle: Path, frame: np.ndarray, b: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every size/quality setting once per round against one server: ``"size/quality"`` -> its measurements."""
    raw: dict[str, list[dict[str, Any]]] = {}
    with ServerProcess(bundle, threads=2, max_batch=8) as srv:
        measure(srv.address, frame, 640, 90, 5)  # warm-up
        for r in range(b["rounds"]):  # rounds interleave all settings so load changes hit all of them
            print(f"bench-client: round {r + 1}/{b['rounds']}", flush=True)
            for size in b["sizes"]:
                for qual in b["qualities"]:
                    m = measure(srv.address, frame, size, qual, b["frames"])
                    raw.setdefault(f"{size}/{qual}", []).append(m)
    return raw


def setting_row(ms: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting's row from its rounds' measurements (top-1 agreement filled in by ``setting_rows``)."""
    keys = ("bytes", "encode_ms", "rtt_ms", "e2e_ms", "server_ms", "labels")
    cat = {k: [x for m in ms for x in m[k]] for k in keys}
    top = max(set(cat["labels"]), key=cat["labels"].count)
    return {
        "max_size": ms[0]["max_size"] or f"0 (full {FRAME_SIZE[0]})",
        "jpeg_quality": ms[0]["jpeg_quality"],
        "sent_w x h": "x".join(map(str, ms[0]["sent_wh"])),
        "kB_per_frame": float(np.mean(cat["bytes"])) / 1e3,
        "Mbit_s_at_30fps": float(np.mean(cat["bytes"])) * 8 * 30 / 1e6,
        "encode_ms_p50": percentile(cat["encode_ms"], 50),
        "rtt_ms_p50": percentile(cat["rtt_ms"], 50),
        "server_ms_p50": percentile(cat["server_ms"], 50),
        "e2e_ms_p50": percentile(cat["e2e_ms"], 50),
        "e2e_ms_p99": percentile(cat["e2e_ms"], 99),
        "same_top1_as_full_frame_top_q": None,
        "top1": top,
        "frames": len(cat["bytes"]),
    }


def setting_rows(raw: dict[str, list[dict[str, Any]]], qualities: list[int]) -> list[dict[str, Any]]:
    rows = [setting_row(ms) for ms in raw.values()]
    best_q = max(qualities)
    ref = next((r["top1"] for r in rows if str(r["max_size"]).startswith("0") and r["jpeg_quality"] == best_q), None)
    for r in rows:
        r["same_top1_as_full_frame_top_q"] = r["top1"] == ref
    return rows


def headlines(rows: list[dict[str, Any]]) -> dict[str, Any]:
    default = next((r for r in rows if r["max_size"] == 640 and r["jpeg_quality"] == 90), None)
    full = next((r for r in rows if str(r["max_size"]).startswith("0") and r["jpeg_quality"] == 90), None)
    return {
        "default_640_q90_kB": default and default["kB_per_frame"],
        "default_640_q90_e2e_ms_p50": default and default["e2e_ms_p50"],
        "full_frame_q90_e2e_ms_p50": full and full["e2e_ms_p50"],
        "bandwidth_saving_640_vs_full_q90": (full["kB_per_frame"] / default["kB_per_frame"])
        if default and full
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    b = BUDGET[args.budget]
    work = work_dir(args, "edgetune-bench-client-")
    t_start = time.perf_counter()
    bundle = build_bundle_subprocess(work / "bundle", "mobilenet_v2", 224)
    raw = run_rounds(bundle, camera_frame(), b)
    rows = setting_rows(raw, b["qualities"])
    headline = headlines(rows)
    write_results(
        "client",
        {
            "budget": args.budget,
            **headline,
            "setup": SETUP,
            "rows": rows,
            "raw": raw,
            "wall_seconds": time.perf_counter() - t_start,
        },
        args.out,
        {
            "Client: bytes per frame and end-to-end latency vs frame size and JPEG quality": md_table(rows, COLUMNS),
            "Headlines": md_table([headline], list(headline)),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
