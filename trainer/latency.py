"""The pre-device-in-the-loop latency protocol: batch-1 ONNX Runtime latency measured inside a training trial,
on that trial's node (1 warm-up, 20 runs, one thread), while other trials train. The tuner no longer uses it
(tuner/device.py times every architecture once, exclusively, with ``edge_server.agent.timing``); it is kept as the
baseline of ``bench/bench_device.py``."""

from __future__ import annotations

from pathlib import Path

from trainer.export import time_onnx

IN_TRIAL_WARMUP, IN_TRIAL_RUNS = 1, 20


def time_onnx_in_trial(
    path: str | Path, input_size: tuple[int, int], runs: int = IN_TRIAL_RUNS, threads: int = 1
) -> list[float]:
    """Per-run latencies (ms) of an ONNX file with the in-trial protocol."""
    return time_onnx(path, input_size, IN_TRIAL_WARMUP, runs, threads)
