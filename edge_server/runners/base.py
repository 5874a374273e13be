"""The one interface every inference backend implements."""

from __future__ import annotations

import abc

import numpy as np


class Runner(abc.ABC):
    """Runs a batch of preprocessed images through a model.

    ``infer`` takes ``float32 [N, 3, H, W]`` (``1 <= N <= max_batch_size``) and returns
    ``float32 [N, C]`` logits. A runner is used from one thread at a time (the batcher's
    worker); ``close`` releases its resources and is idempotent.
    """

    #: Backend description, e.g. ``"onnxruntime:CPUExecutionProvider"`` or ``"tensorrt"``.
    name: str = ""
    #: Numerical precision of the model: ``fp32``, ``fp16`` or ``int8``.
    precision: str = "fp32"
    #: Largest batch ``infer`` accepts.
    max_batch_size: int = 1

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``[N, C]`` for ``batch`` ``[N, 3, H, W]`` float32."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release sessions, engines and device memory."""

    def check_batch(self, batch: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
        """Validate shape/dtype of a batch (shared by the backends); returns a contiguous float32 array."""
        if batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != tuple(input_hw):
            raise ValueError(
                f"{self.name}: batch must be [N, 3, {input_hw[0]}, {input_hw[1]}], got {list(batch.shape)}"
            )
        if not 1 <= batch.shape[0] <= self.max_batch_size:
            raise ValueError(f"{self.name}: batch size {batch.shape[0]} outside 1..{self.max_batch_size}")
        return np.ascontiguousarray(batch, dtype=np.float32)
