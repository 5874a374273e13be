"""One-shot unary classification of one image file (``make client SOURCE=image --once``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc

from edge_client.connection import ClientError, ConnectionOptions, describe_rpc_error, make_channel, watch_connected
from edge_client.frames import EncodeOptions, encode_frame, predictions_to_list
from edgetune.errors import ConfigError
from edgetune.imagedecode import read_image
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc


def classify_once(
    conn: ConnectionOptions, image_path: str, encode: EncodeOptions | None, top_k: int = 1, timeout: float = 10.0
) -> dict[str, Any]:
    """Unary classification of one image file.

    With ``encode`` the image is decoded, resized and JPEG-encoded exactly like a camera frame;
    with ``None`` the file's bytes are sent unchanged.
    """
    path = Path(image_path)
    if not path.is_file():
        raise ConfigError(f"--once {image_path}: no such file")
    if encode is None:
        data = path.read_bytes()
    else:
        rgb = read_image(path)
        data, _ = encode_frame(rgb[..., ::-1].copy(), encode)
    channel = make_channel(conn, connect_timeout=timeout)
    connected = watch_connected(channel)
    try:
        t0 = time.perf_counter()
        res = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(image=data, request_id=path.name, top_k=top_k), timeout=timeout, metadata=conn.metadata()
        )
        latency_ms = (time.perf_counter() - t0) * 1000.0
    except grpc.RpcError as e:
        _, msg = describe_rpc_error(e, conn, deadline_s=timeout, connected=connected.is_set())
        raise ClientError(msg) from None
    finally:
        channel.close()
    preds = predictions_to_list(res.predictions)
    return {
        "image": str(path),
        "label": preds[0]["label"] if preds else None,
        "score": preds[0]["score"] if preds else None,
        "predictions": preds,
        "model_version": res.model_version,
        "latency_ms": round(latency_ms, 3),
        "server_ms": round(res.timing.total_us / 1000.0, 3),
        "sent_bytes": len(data),
    }
