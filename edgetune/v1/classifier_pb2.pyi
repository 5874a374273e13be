from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("image", "request_id", "top_k")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    request_id: str
    top_k: int
    def __init__(self, image: _Optional[bytes] = ..., request_id: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "index", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    score: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("decode_us", "preprocess_us", "queue_us", "infer_us", "total_us", "batch_size")
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_US_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    INFER_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    decode_us: int
    preprocess_us: int
    queue_us: int
    infer_us: int
    total_us: int
    batch_size: int
    def __init__(self, decode_us: _Optional[int] = ..., preprocess_us: _Optional[int] = ..., queue_us: _Optional[int] = ..., infer_us: _Optional[int] = ..., total_us: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "predictions", "model_version", "timing")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_version: str
    timing: Timing
    def __init__(self, request_id: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_version: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("camera_id", "frame_id", "capture_time_us", "image", "top_k")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    frame_id: int
    capture_time_us: int
    image: bytes
    top_k: int
    def __init__(self, camera_id: _Optional[str] = ..., frame_id: _Optional[int] = ..., capture_time_us: _Optional[int] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ...) -> None: ...

class FrameResult(_message.Message):
    __slots__ = ("camera_id", "frame_id", "capture_time_us", "predictions", "model_version", "timing", "dropped_before", "error")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    frame_id: int
    capture_time_us: int
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_version: str
    timing: Timing
    dropped_before: int
    error: str
    def __init__(self, camera_id: _Optional[str] = ..., frame_id: _Optional[int] = ..., capture_time_us: _Optional[int] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_version: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., dropped_before: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("input_size", "resize", "resize_mode", "interpolation", "mean", "std", "channel_order", "layout")
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_MODE_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    input_size: _containers.RepeatedScalarFieldContainer[int]
    resize: int
    resize_mode: str
    interpolation: str
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    channel_order: str
    layout: str
    def __init__(self, input_size: _Optional[_Iterable[int]] = ..., resize: _Optional[int] = ..., resize_mode: _Optional[str] = ..., interpolation: _Optional[str] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., channel_order: _Optional[str] = ..., layout: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("labels", "input", "backend", "precision", "bundle_sha256", "model_version", "backbone", "versions", "max_batch_size")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    input: InputSpec
    backend: str
    precision: str
    bundle_sha256: str
    model_version: str
    backbone: str
    versions: _containers.ScalarMap[str, str]
    max_batch_size: int
    def __init__(self, labels: _Optional[_Iterable[str]] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., backend: _Optional[str] = ..., precision: _Optional[str] = ..., bundle_sha256: _Optional[str] = ..., model_version: _Optional[str] = ..., backbone: _Optional[str] = ..., versions: _Optional[_Mapping[str, str]] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CameraStats(_message.Message):
    __slots__ = ("camera_id", "fps", "frames_received", "frames_processed", "frames_dropped", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    fps: float
    frames_received: int
    frames_processed: int
    frames_dropped: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    def __init__(self, camera_id: _Optional[str] = ..., fps: _Optional[float] = ..., frames_received: _Optional[int] = ..., frames_processed: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., latency_p50_ms: _Optional[float] = ..., latency_p95_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("cameras", "requests_total", "errors_total", "unary_latency_p50_ms", "unary_latency_p95_ms", "unary_latency_p99_ms", "mean_batch_size", "uptime_s", "model_version")
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UNARY_LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    UNARY_LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    UNARY_LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    cameras: _containers.RepeatedCompositeFieldContainer[CameraStats]
    requests_total: int
    errors_total: int
    unary_latency_p50_ms: float
    unary_latency_p95_ms: float
    unary_latency_p99_ms: float
    mean_batch_size: float
    uptime_s: float
    model_version: str
    def __init__(self, cameras: _Optional[_Iterable[_Union[CameraStats, _Mapping]]] = ..., requests_total: _Optional[int] = ..., errors_total: _Optional[int] = ..., unary_latency_p50_ms: _Optional[float] = ..., unary_latency_p95_ms: _Optional[float] = ..., unary_latency_p99_ms: _Optional[float] = ..., mean_batch_size: _Optional[float] = ..., uptime_s: _Optional[float] = ..., model_version: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("bundle_path",)
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    bundle_path: str
    def __init__(self, bundle_path: _Optional[str] = ...) -> None: ...
