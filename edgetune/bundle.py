"""The exported bundle: the only thing the edge needs (read side; NumPy only).

A bundle is a directory::

    model.onnx          opset >= 17, input ``input`` [batch, 3, H, W] float32, output ``logits`` [batch, K]
    bundle.json         the manifest below
    calib/*.png         calibration images from the training split (INT8 calibration)
    check/*.png         check images with their ONNX Runtime top-1 (accuracy check of engines)

``bundle.json`` is one versioned schema, :class:`BundleManifest` (``REQUIRED_KEYS`` must be present)::

    format, schema_version, model_file, onnx_sha256, labels, preprocess, input, output,
    backbone, parity{top1_agreement, max_abs_prob_diff, n_images}, versions,
    calibration_images[{file, label_index}], check_images[{file, label_index, onnx_top1}],
    weights{weights_tag, source}, freeze{...}, source{run, study, trial_id}, metrics{val, test}, variants

One writer (``trainer.export`` builds a :class:`BundleManifest` and writes :meth:`BundleManifest.to_dict`),
one reader (:func:`load_bundle` -> :meth:`BundleManifest.from_dict`, where every field is validated once;
server, calibrator and engine builder use the typed fields). A manifest without ``schema_version`` (written
before it existed) or with another version is refused with both versions named: re-export with ``make export``.

Every file a manifest names (``model_file``, variant files, calibration and check images) and the
``engines`` directory must resolve, symlinks included, to a path inside the bundle directory; anything
else is refused before the file is opened, with the same words whether the target exists or not, so a
hostile manifest can neither read nor probe files elsewhere (:meth:`Bundle.member`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edgetune.errors import BundleError, ConfigError
from edgetune.preprocess import PreprocessSpec

BUNDLE_FORMAT = "edgetune-bundle"
# Version of the bundle.json schema. 1 was the unversioned-schema era (``format_version`` 1, no
# ``schema_version``); 2 added ``schema_version``, typed image lists, ``weights`` and ``freeze``.
BUNDLE_SCHEMA_VERSION = 2
MANIFEST = "bundle.json"
REQUIRED_KEYS = (
    "format",
    "schema_version",
    "model_file",
    "onnx_sha256",
    "labels",
    "preprocess",
    "input",
    "output",
    "backbone",
    "parity",
    "versions",
)
#: ONNX Runtime INT8 quantisations a bundle may carry, as ``variants["int8_<kind>"]``, in the order a runner
#: serving ``precision int8`` with ONNX Runtime prefers them (static: calibrated activations, the faster one).
QUANTIZATIONS = ("static", "dynamic")


def int8_variant_name(kind: str) -> str:
    """The variant key of an INT8 quantisation (one of :data:`QUANTIZATIONS`)."""
    return f"int8_{kind}"


def _frozen(x: Any) -> Any:
    """A read-only deep copy of JSON data (dicts -> mappingproxy, lists -> tuples)."""
    if isinstance(x, Mapping):
        return MappingProxyType({str(k): _frozen(v) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(v) for v in x)
    return x


def _thawed(x: Any) -> Any:
    """JSON-ready copy of :func:`_frozen` data."""
    if isinstance(x, Mapping):
        return {str(k): _thawed(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_thawed(v) for v in x]
    return x


@dataclass(frozen=True)
class ImageEntry:
    """One calibration or check image of a bundle (``file`` relative to the bundle directory)."""

    file: str
    label_index: int | None = None
    onnx_top1: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file}
        if self.label_index is not None:
            out["label_index"] = self.label_index
        if self.onnx_top1 is not None:
            out["onnx_top1"] = self.onnx_top1
        return out


def _int_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _images(where: str, key: str, raw: Any, need_top1: bool = False) -> tuple[ImageEntry, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BundleError(f"{where}: {key} must be a list, got {type(raw).__name__}")
    out = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict) or not isinstance(e.get("file"), str):
            raise BundleError(f"{where}: {key}[{i}] must be an object with a 'file' string, got {e!r}")
        if not _int_or_none(e.get("label_index")) or not _int_or_none(e.get("onnx_top1")):
            raise BundleError(f"{where}: {key}[{i}] label_index/onnx_top1 must be integers, got {e!r}")
        if need_top1 and e.get("onnx_top1") is None:
            raise BundleError(f"{where}: {key}[{i}] needs 'file' and 'onnx_top1', got {e!r}")
        out.append(ImageEntry(file=e["file"], label_index=e.get("label_index"), onnx_top1=e.get("onnx_top1")))
    return tuple(out)


@dataclass(frozen=True)
class BundleManifest:
    """``bundle.json``, typed and frozen (schema :data:`BUNDLE_SCHEMA_VERSION`). ``extra`` keeps the
    informational fields (opset, metrics, source, refused variants, timings) as read-only JSON."""

    model_file: str
    onnx_sha256: str
    labels: tuple[str, ...]
    preprocess: PreprocessSpec
    input: Mapping[str, Any]
    output: Mapping[str, Any]
    backbone: str
    parity: Mapping[str, Any]
    versions: Mapping[str, Any]
    calibration_images: tuple[ImageEntry, ...] = ()
    check_images: tuple[ImageEntry, ...] = ()
    variants: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    weights: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    freeze: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    schema_version: int = BUNDLE_SCHEMA_VERSION
    format: str = BUNDLE_FORMAT

    def __post_init__(self) -> None:
        for name in ("input", "output", "parity", "versions", "variants", "weights", "freeze", "extra"):
            object.__setattr__(self, name, _frozen(getattr(self, name) or {}))
        object.__setattr__(self, "labels", tuple(self.labels))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``bundle.json`` (the only writer's format)."""
        return {
            "format": self.format,
            "schema_version": self.schema_version,
            "model_file": self.model_file,
            "onnx_sha256": self.onnx_sha256,
            "labels": list(self.labels),
            "preprocess": self.preprocess.to_dict(),
            "input": _thawed(self.input),
            "output": _thawed(self.output),
            "backbone": self.backbone,
            "parity": _thawed(self.parity),
            "versions": _thawed(self.versions),
            "calibration_images": [c.to_dict() for c in self.calibration_images],
            "check_images": [c.to_dict() for c in self.check_images],
            "variants": _thawed(self.variants),
            "weights": _thawed(self.weights),
            "freeze": _thawed(self.freeze),
            **_thawed(self.extra),
        }

    @classmethod
    def from_dict(cls, meta: Any, where: str = MANIFEST) -> BundleManifest:  # noqa: C901
        """Validate a parsed ``bundle.json``; raises :class:`BundleError` saying what is wrong."""
        if not isinstance(meta, dict):
            raise BundleError(f"{where}: top level must be an object")
        if meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{where}: format is {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        if "schema_version" not in meta:
            found = f"format_version {meta['format_version']!r}" if "format_version" in meta else "none"
            raise BundleError(
                f"{where}: no schema_version (found: {found}, an older bundle schema); this edgetune reads "
                f"bundle schema_version {BUNDLE_SCHEMA_VERSION}; re-export the bundle with `make export`"
            )
        if meta["schema_version"] != BUNDLE_SCHEMA_VERSION:
            raise BundleError(
                f"{where}: bundle schema_version {meta['schema_version']!r} is not supported (this edgetune reads "
                f"schema_version {BUNDLE_SCHEMA_VERSION}); re-export the bundle with `make export`"
            )
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise BundleError(f"{where}: missing required field(s) {missing}; required: {list(REQUIRED_KEYS)}")
        labels = meta["labels"]
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise BundleError(f"{where}: labels must be a list of at least two class names, got {labels!r}")
        try:
            spec = PreprocessSpec.from_dict(meta["preprocess"])
        except ConfigError as e:
            raise BundleError(f"{where}: invalid preprocess spec: {e}") from None
        for key in ("input", "output", "parity", "versions"):
            if not isinstance(meta[key], dict):
                raise BundleError(f"{where}: {key} must be an object, got {type(meta[key]).__name__}")
        for key in ("variants", "weights", "freeze"):
            if not isinstance(meta.get(key) or {}, dict):
                raise BundleError(f"{where}: {key} must be an object, got {type(meta[key]).__name__}")
        if not isinstance(meta["model_file"], str) or not isinstance(meta["onnx_sha256"], str):
            raise BundleError(f"{where}: model_file and onnx_sha256 must be strings")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(
            model_file=meta["model_file"],
            onnx_sha256=meta["onnx_sha256"],
            labels=tuple(labels),
            preprocess=spec,
            input=meta["input"],
            output=meta["output"],
            backbone=str(meta["backbone"]),
            parity=meta["parity"],
            versions=meta["versions"],
            calibration_images=_images(where, "calibration_images", meta.get("calibration_images")),
            check_images=_images(where, "check_images", meta.get("check_images"), need_top1=True),
            variants=meta.get("variants") or {},
            weights=meta.get("weights") or {},
            freeze=meta.get("freeze") or {},
            extra={k: v for k, v in meta.items() if k not in known},
            schema_version=meta["schema_version"],
            format=meta["format"],
        )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    """A validated bundle directory."""

    path: Path
    meta: dict[str, Any]
    spec: PreprocessSpec
    labels: list[str]
    model_path: Path
    manifest: BundleManifest
    variants: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return str(self.meta["onnx_sha256"])

    @property
    def version(self) -> str:
        """Short model version shown in every result: first 12 hex digits of the ONNX SHA-256."""
        return self.sha256[:12]

    @property
    def input_name(self) -> str:
        return str(self.meta["input"].get("name", "input"))

    @property
    def output_name(self) -> str:
        return str(self.meta["output"].get("name", "logits"))

    def member(self, rel: object, what: str = "file") -> Path:
        """The resolved path of ``rel`` (a path the manifest names), which must lie inside the bundle directory."""
        return member_path(self.path, rel, what)

    @property
    def int8_variant(self) -> str | None:
        """The INT8 variant ONNX Runtime serves at ``precision int8`` (first of :data:`QUANTIZATIONS` present)."""
        return next((int8_variant_name(k) for k in QUANTIZATIONS if int8_variant_name(k) in self.variants), None)

    def variant_path(self, name: str) -> Path:
        """Path of a model variant (``"fp32"`` is model.onnx, e.g. ``"int8_dynamic"``), SHA-checked."""
        if name in ("fp32", "", None):
            return self.model_path
        if name not in self.variants:
            raise BundleError(f"bundle {self.path} has no variant {name!r}; available: {['fp32', *self.variants]}")
        v = self.variants[name]
        if not isinstance(v, dict):
            raise BundleError(f"bundle {self.path}: variants[{name!r}] must be an object with 'file' and 'sha256'")
        p = self.member(v.get("file"), f"variant {name} file")
        if not p.is_file():
            raise BundleError(f"bundle {self.path}: variant file {v['file']} is missing")
        if sha256_file(p) != v.get("sha256"):
            raise BundleError(f"bundle {self.path}: variant {name} ({v['file']}) does not match its recorded SHA-256")
        return p


def member_path(bundle_dir: str | Path, rel: object, what: str = "file") -> Path:
    """``bundle_dir / rel`` resolved (symlinks included); raises :class:`BundleError` unless it stays inside
    the resolved ``bundle_dir``. Checked before anything is opened; the message never depends on the target."""
    base = Path(bundle_dir).resolve()
    bad = BundleError(
        f"bundle {bundle_dir}: {what} {rel!r} must be a relative path to a file inside the bundle directory"
    )
    if not isinstance(rel, str) or not rel or "\0" in rel or Path(rel).is_absolute():
        raise bad
    try:
        target = (base / rel).resolve()
    except (OSError, RuntimeError):  # symlink loops
        raise bad from None
    if target == base or not target.is_relative_to(base):
        raise bad
    return target


def load_bundle(path: str | Path, verify_sha: bool = True) -> Bundle:
    """Load and validate a bundle directory; raises :class:`BundleError` with what is wrong."""
    p = Path(path)
    manifest = member_path(p, MANIFEST, "manifest")
    if not manifest.is_file():
        raise BundleError(f"{p} is not a bundle: {MANIFEST} not found")
    manifest = p / MANIFEST
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest}: unreadable JSON ({e})") from None
    m = BundleManifest.from_dict(meta, str(manifest))
    spec, labels = m.preprocess, m.labels
    model_path = member_path(p, meta["model_file"], "model_file")
    engines = p / "engines"
    if engines.is_symlink() or engines.exists():
        member_path(p, "engines", "engines directory")
    if not model_path.is_file():
        raise BundleError(f"bundle {p}: model file {meta['model_file']} is missing")
    if verify_sha:
        actual = sha256_file(model_path)
        if actual != meta["onnx_sha256"]:
            raise BundleError(
                f"bundle {p}: {meta['model_file']} SHA-256 {actual[:12]}… does not match bundle.json "
                f"{str(meta['onnx_sha256'])[:12]}… (modified or corrupted; re-export the bundle)"
            )
    return Bundle(
        path=p,
        meta=meta,
        spec=spec,
        labels=list(labels),
        model_path=model_path,
        variants=dict(meta.get("variants") or {}),
        manifest=m,
    )
