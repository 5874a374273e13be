"""Test bundles and servers for the edge side (real model, real ONNX Runtime, real gRPC on 127.0.0.1).

``make_test_bundle`` trains a tiny CNN for a few steps on real texture photos (scikit-image's
brick / grass / gravel), exports it to ONNX like the trainer's exporter does (TorchScript
exporter, opset 17, dynamic batch, input ``input``, output ``logits``) and writes a complete
``bundle.json``. When ``trainer/export.py`` lands, replace the body of ``make_test_bundle`` with
a call to it; every edge test goes through this one function.
"""

from __future__ import annotations

import json
import platform
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgetune.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, MANIFEST, sha256_file
from edgetune.preprocess import PreprocessSpec, decode_image

LABELS = ("brick", "grass", "gravel")
TILE = 64


def texture_tiles(split: str = "train", tile: int = TILE) -> tuple[list[np.ndarray], list[int]]:
    """Grey texture photos cut into ``tile`` px RGB tiles; ``train`` = left half, ``test`` = right half."""
    from skimage import data

    images, labels = [], []
    for label, name in enumerate(LABELS):
        photo = getattr(data, name)()  # 512x512 uint8 grey
        h, w = photo.shape[:2]
        x_range = range(0, w // 2 - tile + 1, tile) if split == "train" else range(w // 2, w - tile + 1, tile)
        for y in range(0, h - tile + 1, tile):
            for x in x_range:
                images.append(cv2.cvtColor(np.ascontiguousarray(photo[y:y + tile, x:x + tile]), cv2.COLOR_GRAY2RGB))
                labels.append(label)
    return images, labels


def encode_png(img_rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_jpeg(img_rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def test_spec(size: int = 32) -> PreprocessSpec:
    """Small-input spec (mean/std are the spec's own defaults)."""
    return PreprocessSpec(input_size=(size, size), resize=size)


test_spec.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def make_test_bundle(out_dir: str | Path, *, seed: int = 0, steps: int = 40, size: int = 32,
                     width: int = 8) -> Path:
    """Train a tiny CNN on texture tiles and export it as a bundle into ``out_dir``; returns the path.

    Different ``seed``s give different weights, hence different ``model_version``s.
    """
    import torch
    from torch import nn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = test_spec(size)
    torch.manual_seed(seed)
    imgs, ys = texture_tiles("train")
    x = torch.from_numpy(spec.apply_batch([decode_image(encode_png(i)) for i in imgs]))
    y = torch.tensor(ys)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, len(LABELS)),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    onnx_path = out / "model.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but is the fast, verified path
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, torch.zeros(1, 3, size, size), str(onnx_path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    test_imgs, test_ys = texture_tiles("test")
    xt = torch.from_numpy(spec.apply_batch(test_imgs))
    with torch.no_grad():
        probs = torch.softmax(model(xt), dim=1).numpy()
    acc = float((probs.argmax(1) == np.asarray(test_ys)).mean())
    meta: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "model_file": "model.onnx",
        "onnx_sha256": sha256_file(onnx_path),
        "labels": list(LABELS),
        "preprocess": spec.to_dict(),
        "input": {"name": "input", "shape": ["batch", 3, size, size]},
        "output": {"name": "logits", "shape": ["batch", len(LABELS)]},
        "backbone": "tiny_cnn_test",
        "parity": {"top1_agreement": 1.0, "max_abs_prob_diff": 0.0, "n_images": 0},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "metrics": {"test": {"accuracy": acc}},
        "source": {"run": "tests", "study": "", "trial_id": f"seed{seed}"},
    }
    (out / MANIFEST).write_text(json.dumps(meta, indent=2))
    # Reference probabilities of the torch model for parity checks (not part of the bundle format).
    np.save(out / "reference_probs.npy", probs)
    return out


# -- shared across test modules of one pytest process ------------------------------------------
_BUNDLES: dict[tuple[int, int], Path] = {}
_TMP: Any = None


def cached_test_bundle(seed: int = 0, size: int = 32) -> Path:
    """``make_test_bundle`` once per (seed, size) per test process (training costs a few seconds)."""
    import atexit
    import tempfile

    global _TMP
    if _TMP is None:
        _TMP = tempfile.TemporaryDirectory(prefix="edgetune-test-bundles-")
        atexit.register(_TMP.cleanup)
    key = (seed, size)
    if key not in _BUNDLES:
        _BUNDLES[key] = make_test_bundle(Path(_TMP.name) / f"seed{seed}-{size}", seed=seed, size=size)
    return _BUNDLES[key]


def copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def self_signed_cert(out_dir: Path, name: str = "localhost", ca: tuple[Any, Any] | None = None
                     ) -> tuple[Path, Path, Any, Any]:
    """Write ``<name>.crt``/``<name>.key`` (SAN localhost + 127.0.0.1); signed by ``ca`` = (cert, key) if given.

    Returns (cert_path, key_path, cert, key) so the result can itself serve as a CA.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = ca if ca is not None else (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                              critical=False)
               .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True))
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, cert, key


class RequestFeeder:
    """A request iterator for bidi streams that the test feeds one message at a time."""

    _END = object()

    def __init__(self) -> None:
        import queue

        self._q: Any = queue.Queue()

    def send(self, msg: Any) -> None:
        self._q.put(msg)

    def end(self) -> None:
        self._q.put(self._END)

    def __iter__(self) -> RequestFeeder:
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is self._END:
            raise StopIteration
        return item
