"""Test bundles and servers for the edge side (real model, real ONNX Runtime, real gRPC on 127.0.0.1).

``make_test_bundle`` trains a tiny CNN for a few steps on real texture photos (scikit-image's
brick / grass / gravel), exports it to ONNX like the trainer's exporter does (TorchScript
exporter, opset 17, dynamic batch, input ``input``, output ``logits``) and writes a complete
``bundle.json``. When ``trainer/export.py`` lands, replace the body of ``make_test_bundle`` with
a call to it; every edge test goes through this one function.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgetune.bundle import load_bundle
from edgetune.preprocess import PreprocessSpec

LABELS = ("brick", "grass", "gravel")
_REPO = Path(__file__).resolve().parents[1]
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
                images.append(cv2.cvtColor(np.ascontiguousarray(photo[y : y + tile, x : x + tile]), cv2.COLOR_GRAY2RGB))
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


def make_test_bundle(out_dir: str | Path, *, seed: int = 0, steps: int = 1, size: int = 32) -> Path:
    """Train a tiny real model with the trainer (EfficientNet-Lite0, ImageNet weights, head only, texture
    photos) and export it with the trainer's exporter into ``out_dir``; returns the bundle path.

    ``steps`` is the number of epochs. Different ``seed``s give different weights, hence different
    ``model_version``s. Also writes ``reference_probs.npy`` (the torch model's softmax on
    ``texture_tiles("test")``; a test aid, not part of the bundle format).
    """
    import tempfile

    import torch

    from trainer.config import TrainConfig
    from trainer.export import export_bundle
    from trainer.model import model_from_checkpoint
    from trainer.run import run_training

    out = Path(out_dir)
    cfg = TrainConfig.from_dict(
        {
            "data": {"dataset": "textures", "max_images": 60},
            "model": {"backbone": "efficientnet_lite0", "img_size": size, "freeze": 1.0},
            "optim": {"lr": 1e-2},
            "epochs": max(1, steps),
            "batch_size": 16,
            "seed": seed,
            "progress": False,
            "robustness": False,
        }
    )
    with tempfile.TemporaryDirectory(prefix="edgetune-fixture-run-") as run:
        run_training(cfg, run)
        export_bundle(run, out)
        model, _ = model_from_checkpoint(Path(run) / "best")
    test_imgs, _ = texture_tiles("test")
    spec = load_bundle(out).spec
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(spec.apply_batch(test_imgs))), dim=1).numpy()
    np.save(out / "reference_probs.npy", probs)
    return out


# -- shared across test modules of one pytest process ------------------------------------------
_BUNDLES: dict[tuple[int, int], Path] = {}
_TMP: Any = None


def cached_test_bundle(seed: int = 0, size: int = 32) -> Path:
    """``make_test_bundle`` once per (seed, size) per test process (training costs a few seconds). Tests take
    it through the fixtures in ``tests/conftest.py`` (``bundle_dir``, ``bundle_dir_b``, ``loaded_bundle``,
    ``bundle_copy``), which also check that no test writes into the shared directories.

    Developers re-running single test files may set ``EDGETUNE_TEST_BUNDLE_DIR`` to keep the bundles in
    that folder between runs (delete it after changing the trainer or the exporter); unset, every test
    process trains its own.
    """
    import atexit
    import os
    import tempfile

    keep = os.environ.get("EDGETUNE_TEST_BUNDLE_DIR")
    if keep:
        out = Path(keep) / f"seed{seed}-{size}"
        if not (out / "reference_probs.npy").is_file():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            make_test_bundle(out, seed=seed, size=size)
        return out
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


def self_signed_cert(
    out_dir: Path, name: str = "localhost", ca: tuple[Any, Any] | None = None
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
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path, cert, key


class RequestFeeder:
    """A request iterator for bidi streams that the test feeds one message at a time; with ``timeout``, a
    wait for the next message longer than that (seconds) raises ``queue.Empty``, so gRPC cancels the call."""

    _END = object()

    def __init__(self, timeout: float | None = None) -> None:
        import queue

        self._q: Any = queue.Queue()
        self._timeout = timeout

    def send(self, msg: Any) -> None:
        self._q.put(msg)

    def end(self) -> None:
        self._q.put(self._END)

    def __iter__(self) -> RequestFeeder:
        return self

    def __next__(self) -> Any:
        item = self._q.get(timeout=self._timeout)
        if item is self._END:
            raise StopIteration
        return item


class CliServer:
    """``python -m edge_server ARGS`` as a subprocess on 127.0.0.1 (its own RSS, its JSON log in ``log_path``);
    ``port`` is read from the "serving" log line. ``stop()`` sends SIGTERM (SIGKILL after 30 s)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_server", *args],
            cwd=_REPO,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        deadline = time.monotonic() + 90
        self.port = 0
        while time.monotonic() < deadline and not self.port:
            for rec in self.records():
                if rec.get("msg") == "serving":
                    self.port = int(rec["port"])
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        assert self.port, f"server did not start: {log_path.read_text()[-2000:]}"
        self.address = f"127.0.0.1:{self.port}"

    def records(self) -> list[dict[str, Any]]:
        """The log so far; every complete line must be JSON."""
        text = self.log_path.read_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines = lines[:-1]  # being written
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        """SIGKILL (no drain, no last log line)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def hwm_mb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) // 1024
        raise AssertionError("no VmHWM")

    def stop(self) -> None:
        if self._log.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
