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
    __slots__ = ("cameras", "requests_total", "errors_total", "unary_latency_p50_ms", "unary_latency_p95_ms", "unary_latency_p99_ms", "mean_batch_size", "uptime_s", "model_version", "drift", "capture")
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERRORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UNARY_LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    UNARY_LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    UNARY_LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_FIELD_NUMBER: _ClassVar[int]
    cameras: _containers.RepeatedCompositeFieldContainer[CameraStats]
    requests_total: int
    errors_total: int
    unary_latency_p50_ms: float
    unary_latency_p95_ms: float
    unary_latency_p99_ms: float
    mean_batch_size: float
    uptime_s: float
    model_version: str
    drift: DriftStats
    capture: CaptureStats
    def __init__(self, cameras: _Optional[_Iterable[_Union[CameraStats, _Mapping]]] = ..., requests_total: _Optional[int] = ..., errors_total: _Optional[int] = ..., unary_latency_p50_ms: _Optional[float] = ..., unary_latency_p95_ms: _Optional[float] = ..., unary_latency_p99_ms: _Optional[float] = ..., mean_batch_size: _Optional[float] = ..., uptime_s: _Optional[float] = ..., model_version: _Optional[str] = ..., drift: _Optional[_Union[DriftStats, _Mapping]] = ..., capture: _Optional[_Union[CaptureStats, _Mapping]] = ...) -> None: ...

class ClassShare(_message.Message):
    __slots__ = ("label", "predicted_share", "train_share")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SHARE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SHARE_FIELD_NUMBER: _ClassVar[int]
    label: str
    predicted_share: float
    train_share: float
    def __init__(self, label: _Optional[str] = ..., predicted_share: _Optional[float] = ..., train_share: _Optional[float] = ...) -> None: ...

class DriftStats(_message.Message):
    __slots__ = ("mean_confidence", "window", "classes", "total_variation")
    MEAN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_VARIATION_FIELD_NUMBER: _ClassVar[int]
    mean_confidence: float
    window: int
    classes: _containers.RepeatedCompositeFieldContainer[ClassShare]
    total_variation: float
    def __init__(self, mean_confidence: _Optional[float] = ..., window: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[ClassShare, _Mapping]]] = ..., total_variation: _Optional[float] = ...) -> None: ...

class CaptureStats(_message.Message):
    __slots__ = ("enabled", "captured", "counters", "spool_files", "spool_bytes", "paused", "queued")
    class CapturedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    SPOOL_FILES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    captured: _containers.ScalarMap[str, int]
    counters: _containers.ScalarMap[str, int]
    spool_files: int
    spool_bytes: int
    paused: bool
    queued: int
    def __init__(self, enabled: _Optional[bool] = ..., captured: _Optional[_Mapping[str, int]] = ..., counters: _Optional[_Mapping[str, int]] = ..., spool_files: _Optional[int] = ..., spool_bytes: _Optional[int] = ..., paused: _Optional[bool] = ..., queued: _Optional[int] = ...) -> None: ...

class ListCapturesRequest(_message.Message):
    __slots__ = ("after", "limit")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after: str
    limit: int
    def __init__(self, after: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class CapturedFrame(_message.Message):
    __slots__ = ("id", "frame_name", "frame_bytes", "frame_sha256", "reason", "sidecar_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_NAME_FIELD_NUMBER: _ClassVar[int]
    FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAME_SHA256_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIDECAR_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    frame_name: str
    frame_bytes: int
    frame_sha256: str
    reason: str
    sidecar_json: str
    def __init__(self, id: _Optional[str] = ..., frame_name: _Optional[str] = ..., frame_bytes: _Optional[int] = ..., frame_sha256: _Optional[str] = ..., reason: _Optional[str] = ..., sidecar_json: _Optional[str] = ...) -> None: ...

class CaptureList(_message.Message):
    __slots__ = ("frames", "more", "spool_files", "spool_bytes")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    SPOOL_FILES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[CapturedFrame]
    more: bool
    spool_files: int
    spool_bytes: int
    def __init__(self, frames: _Optional[_Iterable[_Union[CapturedFrame, _Mapping]]] = ..., more: _Optional[bool] = ..., spool_files: _Optional[int] = ..., spool_bytes: _Optional[int] = ...) -> None: ...

class FetchCaptureRequest(_message.Message):
    __slots__ = ("id", "offset", "length")
    ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    id: str
    offset: int
    length: int
    def __init__(self, id: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class CaptureChunk(_message.Message):
    __slots__ = ("id", "offset", "data", "total_bytes", "eof")
    ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    id: str
    offset: int
    data: bytes
    total_bytes: int
    eof: bool
    def __init__(self, id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., eof: _Optional[bool] = ...) -> None: ...

class CaptureAck(_message.Message):
    __slots__ = ("id", "frame_sha256")
    ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_SHA256_FIELD_NUMBER: _ClassVar[int]
    id: str
    frame_sha256: str
    def __init__(self, id: _Optional[str] = ..., frame_sha256: _Optional[str] = ...) -> None: ...

class AckCapturesRequest(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[CaptureAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[CaptureAck, _Mapping]]] = ...) -> None: ...

class AckCapturesResponse(_message.Message):
    __slots__ = ("deleted", "not_found")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("bundle_path",)
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    bundle_path: str
    def __init__(self, bundle_path: _Optional[str] = ...) -> None: ...
