"""Serving overhead: the gRPC edge server (ONNX Runtime, CPU, subprocess on 127.0.0.1) at 1, 4 and 16
concurrent streams vs ONNX Runtime called in-process on the same model and the same JPEG, with the same
``decode_image`` + ``spec.apply`` in the baseline. Blocks of both are interleaved so load changes hit both.

Writes bench/results/serve.json (headlines ``p50_ratio_1_stream``, ``throughput_ratio_16_streams``)."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ServerProcess,
    build_bundle_subprocess,
    md_table,
    parse_args,
    percentile,
    test_jpeg,
    work_dir,
    write_results,
)

BUDGET = {
    "small": {"rounds": 3, "frames_1": 40, "frames_per_stream": 12, "warmup": 10},
    "large": {"rounds": 6, "frames_1": 150, "frames_per_stream": 40, "warmup": 20},
}
THREADS = 2  # ONNX Runtime intra-op threads, server and in-process alike


class InProcess:
    """The baseline: decode + the bundle's preprocessing + ONNX Runtime in this process."""

    def __init__(self, bundle_dir: Path) -> None:
        import onnxruntime as ort

        from edgetune.bundle import load_bundle

        self.bundle = load_bundle(bundle_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(self.bundle.model_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name

    def classify(self, jpegs: list[bytes]) -> np.ndarray:
        from edgetune.imagedecode import decode_image
        from edgetune.numeric import softmax

        x = np.stack([self.bundle.spec.apply(decode_image(b)) for b in jpegs])
        logits = self.session.run(None, {self.input: x})[0]
        return softmax(logits, axis=1).argmax(1)


def inproc_block(ip: InProcess, jpeg: bytes, n: int, batch: int) -> dict[str, Any]:
    lat = []
    t0 = time.perf_counter()
    for _ in range(max(1, n // batch)):
        t = time.perf_counter()
        ip.classify([jpeg] * batch)
        lat.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - t0
    return {"latencies_ms": lat, "images": len(lat) * batch, "seconds": wall}


class InProcessWorker:
    """The baseline in its own process (no gRPC threads, no torch in it): ``block(n, batch)`` on demand, so the
    blocks still interleave with the server's."""

    def __init__(self, bundle_dir: Path) -> None:
        import subprocess

        cmd = [sys.executable, str(Path(__file__).resolve()), "--inproc-worker", str(bundle_dir)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def block(self, n: int, batch: int) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None  # noqa: S101 - set by Popen(PIPE)
        self.proc.stdin.write(json.dumps({"n": n, "batch": batch}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"in-process baseline worker exited with code {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except Exception:  # noqa: BLE001 - still running: stop it by its own handle
            self.proc.kill()
            self.proc.wait(5)


def worker_main(bundle_dir: str) -> int:
    ip = InProcess(Path(bundle_dir))
    jpeg = test_jpeg(512, 90)
    for line in sys.stdin:
        cmd = json.loads(line)
        print(json.dumps(inproc_block(ip, jpeg, int(cmd["n"]), int(cmd["batch"]))), flush=True)
    return 0


def _stream(
    address: str,
    cam: str,
    jpeg: bytes,
    n: int,
    lat: list[float],
    timing: list[dict[str, int]],
    start: threading.Barrier,
) -> None:
    import grpc

    from edgetune.v1 import classifier_pb2 as pb
    from edgetune.v1 import classifier_pb2_grpc as pbg

    q: queue.Queue[Any] = queue.Queue()

    def gen() -> Any:
        while True:
            item = q.get()
            if item is None:
                return
            yield item

    with grpc.insecure_channel(address) as ch:
        responses = pbg.ClassifierStub(ch).StreamClassify(gen())
        start.wait()
        for i in range(n):
            t = time.perf_counter()
            q.put(pb.Frame(camera_id=cam, frame_id=i + 1, image=jpeg, top_k=1))
            r = next(responses)
            lat.append((time.perf_counter() - t) * 1e3)
            if r.error:
                raise RuntimeError(f"server error on frame {i + 1}: {r.error}")
            tm = r.timing
            timing.append(
                {
                    "decode_us": tm.decode_us,
                    "preprocess_us": tm.preprocess_us,
                    "queue_us": tm.queue_us,
                    "infer_us": tm.infer_us,
                    "total_us": tm.total_us,
                    "batch_size": tm.batch_size,
                }
            )
        q.put(None)
        for _ in responses:
            pass


def server_block(address: str, jpeg: bytes, streams: int, n_per_stream: int) -> dict[str, Any]:
    lats: list[list[float]] = [[] for _ in range(streams)]
    timings: list[list[dict[str, int]]] = [[] for _ in range(streams)]
    barrier = threading.Barrier(streams + 1)
    threads = [
        threading.Thread(target=_stream, args=(address, f"cam{i}", jpeg, n_per_stream, lats[i], timings[i], barrier))
        for i in range(streams)
    ]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [x for xs in lats for x in xs]
    if len(lat) != streams * n_per_stream:
        raise RuntimeError(f"{streams} stream(s): got {len(lat)} of {streams * n_per_stream} results")
    return {
        "latencies_ms": lat,
        "images": len(lat),
        "seconds": wall,
        "server_timing": [x for xs in timings for x in xs],
    }


def merge(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for b in blocks for x in b["latencies_ms"]]
    images, seconds = sum(b["images"] for b in blocks), sum(b["seconds"] for b in blocks)
    out = {
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "mean_ms": float(np.mean(lat)),
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "per_block_images_per_s": [b["images"] / b["seconds"] for b in blocks],
    }
    st = [x for b in blocks for x in b.get("server_timing", [])]
    if st:
        out["server_ms_median"] = {
            k: float(np.median([t[k] for t in st])) / (1 if k == "batch_size" else 1e3) for k in st[0]
        }
        transport = [lat_i - t["total_us"] / 1e3 for lat_i, t in zip(lat, st, strict=True)]
        out["transport_ms_median"] = float(np.median(transport))
    return out


RAW_KEYS = (
    "inproc_b1",
    "inproc_b8",
    "server_1",
    "server_4",
    "server_16",
    "server_16_maxbatch1",
    "server_1_wait0",
    "server_16_wait0",
)
SETUP = {
    "model": "mobilenet_v2 (weights=none, head trained 1 epoch on textures; speed only)",
    "input": "scikit-image astronaut 512x512 JPEG q90",
    "img_size": 224,
    "ort_intra_op_threads": THREADS,
    "server": "python -m edge_server subprocess, --backend onnxruntime; default --max-wait-ms 2 "
    "(headlines), "
    "plus a --max-wait-ms 0 server to show what the micro-batch wait costs one stream",
    "client": "closed loop: each stream sends its next frame after the previous result",
    "baseline_process": "the in-process baseline runs in its own child process (no gRPC, no torch threads)",
    "interleaving": "per round: in-process b1, server 1 stream, in-process b8, server 4/16 streams, "
    "server max_batch=1 16 streams, server max_wait 0 at 1 and 16 streams",
}


def measure(bundle: Path, b: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """The interleaved rounds: in-process baseline and the three servers, one block of each per round."""
    jpeg = test_jpeg(512, 90)
    ip = InProcessWorker(bundle)
    raw: dict[str, list[dict[str, Any]]] = {k: [] for k in RAW_KEYS}
    with (
        ServerProcess(bundle, THREADS, max_batch=8) as s8,
        ServerProcess(bundle, THREADS, max_batch=1) as s1,
        ServerProcess(bundle, THREADS, max_batch=8, max_wait_ms=0.0) as s0,
    ):
        ip.block(b["warmup"], 1)  # warm-up (first runs allocate)
        server_block(s8.address, jpeg, 1, b["warmup"])
        server_block(s1.address, jpeg, 4, 3)
        for r in range(b["rounds"]):
            print(f"bench-serve: round {r + 1}/{b['rounds']}", flush=True)
            raw["inproc_b1"].append(ip.block(b["frames_1"], 1))
            raw["server_1"].append(server_block(s8.address, jpeg, 1, b["frames_1"]))
            raw["server_1_wait0"].append(server_block(s0.address, jpeg, 1, b["frames_1"]))
            raw["inproc_b8"].append(ip.block(b["frames_per_stream"] * 16, 8))
            raw["server_4"].append(server_block(s8.address, jpeg, 4, b["frames_per_stream"]))
            raw["server_16"].append(server_block(s8.address, jpeg, 16, b["frames_per_stream"]))
            raw["server_16_maxbatch1"].append(server_block(s1.address, jpeg, 16, b["frames_per_stream"]))
            raw["server_16_wait0"].append(server_block(s0.address, jpeg, 16, b["frames_per_stream"]))
    ip.close()
    return raw


def path_rows(res: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per measured path, with its throughput against the in-process batched limit."""
    limit = res["inproc_b8"]["images_per_s"]
    rows = [
        {"path": "in-process, batch 1 (1 caller)", **res["inproc_b1"]},
        {"path": "in-process, batch 8 (batched limit)", **res["inproc_b8"]},
        {"path": "server, 1 stream", **res["server_1"]},
        {"path": "server, 4 streams", **res["server_4"]},
        {"path": "server, 16 streams", **res["server_16"]},
        {"path": "server max_batch=1, 16 streams", **res["server_16_maxbatch1"]},
        {"path": "server max_wait_ms=0, 1 stream", **res["server_1_wait0"]},
        {"path": "server max_wait_ms=0, 16 streams", **res["server_16_wait0"]},
    ]
    for r in rows:
        r["vs_batched_limit"] = r["images_per_s"] / limit
    return rows


def profile_rows(res: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each server path's time goes: the server's own medians and the client-side remainder."""
    prof = []
    for k in ("server_1", "server_4", "server_16", "server_16_maxbatch1", "server_1_wait0", "server_16_wait0"):
        sm = res[k]["server_ms_median"]
        prof.append(
            {"path": k, **{f"{n}": v for n, v in sm.items()}, "client_minus_server_ms": res[k]["transport_ms_median"]}
        )
    return prof


def headlines(res: dict[str, dict[str, Any]]) -> dict[str, Any]:
    limit = res["inproc_b8"]["images_per_s"]
    p50_ratio = res["server_1"]["p50_ms"] / res["inproc_b1"]["p50_ms"]
    thr_ratio = res["server_16"]["images_per_s"] / limit
    return {
        "p50_ratio_1_stream": p50_ratio,
        "p50_target": 1.15,
        "p50_target_met": p50_ratio <= 1.15,
        "throughput_ratio_16_streams": thr_ratio,
        "throughput_target": 0.9,
        "throughput_target_met": thr_ratio >= 0.9,
        "micro_batching_gain_16_streams": res["server_16"]["images_per_s"] / res["server_16_maxbatch1"]["images_per_s"],
        "inprocess_batching_gain": limit / res["inproc_b1"]["images_per_s"],
        "p50_ratio_1_stream_max_wait_0": res["server_1_wait0"]["p50_ms"] / res["inproc_b1"]["p50_ms"],
        "throughput_ratio_16_streams_max_wait_0": res["server_16_wait0"]["images_per_s"] / limit,
    }


def serve_tables(res: dict[str, dict[str, Any]], headline: dict[str, Any]) -> dict[str, str]:
    return {
        "Serving: server vs in-process ONNX Runtime (same JPEG, decode + preprocessing in both)": md_table(
            path_rows(res), ["path", "images_per_s", "vs_batched_limit", "p50_ms", "p99_ms", "mean_ms", "images"]
        ),
        "Where the server's time goes (medians, ms; batch_size = median micro-batch)": md_table(
            profile_rows(res),
            [
                "path",
                "decode_us",
                "preprocess_us",
                "queue_us",
                "infer_us",
                "total_us",
                "batch_size",
                "client_minus_server_ms",
            ],
        ),
        "Headlines": md_table([headline], list(headline)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    work = work_dir(args, "edgetune-bench-serve-")
    t_start = time.perf_counter()
    bundle = build_bundle_subprocess(work / "bundle", "mobilenet_v2", 224)
    raw = measure(bundle, BUDGET[args.budget])
    res = {k: merge(v) for k, v in raw.items()}
    headline = headlines(res)
    write_results(
        "serve",
        {
            "budget": args.budget,
            **headline,
            "setup": SETUP,
            "summary": res,
            "raw": raw,
            "wall_seconds": time.perf_counter() - t_start,
        },
        args.out,
        serve_tables(res, headline),
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--inproc-worker":
        raise SystemExit(worker_main(sys.argv[2]))
    raise SystemExit(main())
