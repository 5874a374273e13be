"""The exported bundle: the only thing the edge needs (read side; NumPy only).

A bundle is a directory::

    model.onnx          opset >= 17, input ``input`` [batch, 3, H, W] float32, output ``logits`` [batch, K]
    bundle.json         the manifest below
    calib/*.png         calibration images from the training split (INT8 calibration)
    check/*.png         check images with their ONNX Runtime top-1 (accuracy check of engines)

``bundle.json`` keys (``REQUIRED_KEYS`` must be present)::

    format, format_version, model_file, onnx_sha256, labels, preprocess, input, output,
    backbone, parity{top1_agreement, max_abs_prob_diff, n_images}, versions,
    calibration_images, check_images, source{run, study, trial_id}, metrics{val, test}, variants

The trainer's export writes it (``trainer.export``); server and engine builder read it here.

Every file a manifest names (``model_file``, variant files, calibration and check images) and the
``engines`` directory must resolve, symlinks included, to a path inside the bundle directory; anything
else is refused before the file is opened, with the same words whether the target exists or not, so a
hostile manifest can neither read nor probe files elsewhere (:meth:`Bundle.member`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.errors import BundleError, ConfigError
from edgetune.preprocess import PreprocessSpec

BUNDLE_FORMAT = "edgetune-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "bundle.json"
REQUIRED_KEYS = (
    "format",
    "format_version",
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
    bad = BundleError(f"bundle {bundle_dir}: {what} {rel!r} must be a relative path to a file inside the bundle "
                      "directory")
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
    if not isinstance(meta, dict):
        raise BundleError(f"{manifest}: top level must be an object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise BundleError(f"{manifest}: missing required field(s) {missing}; required: {list(REQUIRED_KEYS)}")
    if meta["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{manifest}: format is {meta['format']!r}, expected {BUNDLE_FORMAT!r}")
    if meta["format_version"] != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{manifest}: format_version {meta['format_version']!r} is not supported (this edgetune reads "
            f"{BUNDLE_FORMAT_VERSION}); re-export the bundle"
        )
    labels = meta["labels"]
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise BundleError(f"{manifest}: labels must be a list of at least two class names, got {labels!r}")
    try:
        spec = PreprocessSpec.from_dict(meta["preprocess"])
    except ConfigError as e:
        raise BundleError(f"{manifest}: invalid preprocess spec: {e}") from None
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
    return Bundle(path=p, meta=meta, spec=spec, labels=list(labels), model_path=model_path,
                  variants=dict(meta.get("variants") or {}))
