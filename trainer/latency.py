"""The pre-device-in-the-loop latency protocol: batch-1 ONNX Runtime latency measured inside a training trial,
on that trial's node (1 warm-up, 20 runs, one thread), while other trials train. The tuner no longer uses it
(tuner/device.py times every architecture once, exclusively, with ``edge_server.timing``); it is kept as the
baseline of ``bench/bench_device.py``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from trainer.export import INPUT, OUTPUT, ort_session

IN_TRIAL_WARMUP, IN_TRIAL_RUNS = 1, 20


def time_onnx_in_trial(path: str | Path, input_size: tuple[int, int], runs: int = IN_TRIAL_RUNS,
                       threads: int = 1) -> list[float]:
    """Per-run latencies (ms) of an ONNX file with the in-trial protocol."""
    sess = ort_session(path, threads=threads)
    x = np.zeros((1, 3, *input_size), np.float32)
    for _ in range(IN_TRIAL_WARMUP):
        sess.run([OUTPUT], {INPUT: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run([OUTPUT], {INPUT: x})
        times.append((time.perf_counter() - t) * 1e3)
    return times
