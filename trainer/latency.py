"""Batch-1 ONNX Runtime latency of a model on this node's CPU (the latency objective / constraint)."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgetune.preprocess import PreprocessSpec
from trainer.export import INPUT, OUTPUT, export_onnx, ort_session


def measure_latency(model: torch.nn.Module, spec: PreprocessSpec, runs: int = 20, threads: int = 1) -> float:
    """Median ONNX Runtime latency (ms) of ``model`` at batch 1 on this node's CPU (multi-objective mode)."""
    m = copy.deepcopy(model).cpu().eval()
    with tempfile.TemporaryDirectory(prefix="edgetune-lat-") as d:
        sess = ort_session(export_onnx(m, spec, Path(d) / "m.onnx"), threads=threads)
        x = np.zeros((1, 3, *spec.input_size), np.float32)
        sess.run([OUTPUT], {INPUT: x})
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run([OUTPUT], {INPUT: x})
            times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))
