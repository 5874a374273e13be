"""trainer.data: scan, split, manifest, slicing/expansion after the split, caching, image modes, CSV input."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from edgetune.errors import ConfigError, EdgetuneError
from edgetune.preprocess import PreprocessSpec
from trainer.config import DataConfig
from trainer.data import build_data, split_members
from trainer.imagestore import build_store, decode_throughput, make_items
from trainer.scan import hash_files, list_image_folder

SPEC32 = PreprocessSpec(input_size=(32, 32), resize=36)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.getbasetemp() / "edgetune-cache"  # shared by the test modules of this session
    d.mkdir(exist_ok=True)
    return str(d)


def _photos() -> dict[str, np.ndarray]:
    return {"brick": skdata.brick(), "grass": skdata.grass(), "gravel": skdata.gravel()}


def make_folder(root: Path, per_class: int = 10, size: int = 40) -> Path:
    """A real-image ImageFolder: non-overlapping crops of scikit-image's texture photos (grey PNG)."""
    for name, photo in _photos().items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            y, x = (i // 8) * 64, (i % 8) * 64
            cv2.imwrite(str(root / name / f"{name}_{i:02d}.png"), photo[y : y + size, x : x + size])
    return root


def cfg(dataset: str | Path, cache: str, **kw) -> DataConfig:
    return DataConfig(dataset=str(dataset), cache_dir=cache, **kw)


def test_textures_builtin_eval_transform_is_exact(cache: str, tmp_path: Path) -> None:
    d = build_data(cfg("textures", cache, augment="graphite"), SPEC32, run_dir=tmp_path, seed=0)
    assert d.classes == ["brick", "grass", "gravel"]
    assert d.dataset_name == "textures" and len(d.dataset_hash) == 64
    assert (len(d.train), len(d.val), len(d.test), len(d.train_eval)) == (336, 42, 42, 336)
    assert d.class_counts == [112, 112, 112]
    for ds in (d.val, d.test, d.train_eval):
        for i in (0, len(ds) // 2, len(ds) - 1):
            x, y = ds[i]
            raw, label = ds.raw(i)
            assert raw.dtype == np.uint8 and raw.shape == (96, 96, 3) and label == y
            expected = SPEC32.normalize(SPEC32.center_crop(SPEC32.resize_image(raw)))
            assert x.dtype == torch.float32 and np.array_equal(x.numpy(), expected)  # bit-exact, same NumPy code
    x, y = d.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    # The preparer's spatial split is used (not a seeded one): val/test tiles come from the bottom bands.
    man = json.loads((tmp_path / "split.json").read_text())
    assert man["predefined_split"] is True
    for f in man["files"]:
        y0 = int(f["path"].split("_y")[1][:3])
        assert {"train": y0 + 96 <= 320, "val": 320 <= y0 <= 320, "test": y0 == 416}[f["split"]], f


def test_folder_split_is_stratified_deterministic_and_recorded(cache: str, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", per_class=10)
    a = build_data(cfg(root, cache, split_seed=3), SPEC32, run_dir=tmp_path / "r1")
    b = build_data(cfg(root, cache, split_seed=3), SPEC32, run_dir=tmp_path / "r2")
    c = build_data(cfg(root, cache, split_seed=4), SPEC32, run_dir=tmp_path / "r3")
    assert a.dataset_name == "ds" and a.classes == ["brick", "grass", "gravel"]
    for s in ("train", "val", "test"):
        labels = [lab for _, lab in (getattr(a, s)[i] for i in range(len(getattr(a, s))))]
        assert sorted(set(labels)) == [0, 1, 2], s  # every class in every split
        # 10 per class at 70/15/15 -> 6/2/2 per class
        assert np.bincount(labels).tolist() == ({"train": [6] * 3}.get(s, [2] * 3))
    m1 = json.loads((tmp_path / "r1" / "split.json").read_text())
    m2 = json.loads((tmp_path / "r2" / "split.json").read_text())
    m3 = json.loads((tmp_path / "r3" / "split.json").read_text())
    assert m1["files"] == m2["files"] and split_members(a) == split_members(b)  # same seed -> same split
    assert [f["split"] for f in m1["files"]] != [f["split"] for f in m3["files"]]  # another seed -> another split
    # The manifest lists every source file once with its label and split, matching the datasets.
    assert len(m1["files"]) == 30 and len({f["path"] for f in m1["files"]}) == 30
    assert all(f["path"].split("/")[0] == f["label"] for f in m1["files"])
    members = split_members(a)
    for s in ("train", "val", "test"):
        assert {f["abs_path"] for f in m1["files"] if f["split"] == s} == members[s]
    assert m1["dataset_hash"] == a.dataset_hash == c.dataset_hash and m1["classes"] == a.classes
    assert a.manifest_path == tmp_path / "r1" / "split.json"


def test_corrupt_files_are_skipped_or_fail_in_strict_mode(cache: str, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", per_class=4)
    good = (root / "brick" / "brick_00.png").read_bytes()
    bad = {
        root / "brick" / "truncated.png": good[: len(good) // 2],
        root / "grass" / "garbage.jpg": b"this is not a jpeg at all" * 10,
        root / "gravel" / "empty.png": b"",
        root / "gravel" / "notes.txt": b"hello",
    }
    for p, content in bad.items():
        p.write_bytes(content)
    d = build_data(cfg(root, cache), SPEC32)
    assert sorted(p for p, _ in d.skipped) == sorted(str(p.resolve()) for p in bad)
    assert all(reason for _, reason in d.skipped)
    assert len(d.train) + len(d.val) + len(d.test) == 12
    for ds in (d.train, d.val, d.test):  # every item loads: never a crash mid-epoch
        for i in range(len(ds)):
            assert torch.isfinite(ds[i][0]).all()
    with pytest.raises(EdgetuneError) as e:
        build_data(cfg(root, cache, strict=True), SPEC32)
    for p in bad:
        assert str(p.resolve()) in str(e.value)


def test_empty_single_class_and_too_small_datasets_fail_clearly(cache: str, tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(EdgetuneError, match="no image files"):
        build_data(cfg(tmp_path / "empty", cache), SPEC32)
    one = make_folder(tmp_path / "one", per_class=4)
    for name in ("grass", "gravel"):
        for p in (one / name).iterdir():
            p.unlink()
        (one / name).rmdir()
    with pytest.raises(EdgetuneError, match="only one class"):
        build_data(cfg(one, cache), SPEC32)
    small = make_folder(tmp_path / "small", per_class=4)
    for p in sorted((small / "grass").iterdir())[2:]:
        p.unlink()
    with pytest.raises(EdgetuneError, match="too few images.*grass"):
        build_data(cfg(small, cache), SPEC32)
    with pytest.raises(ConfigError, match="neither a built-in"):
        build_data(cfg(tmp_path / "does-not-exist", cache), SPEC32)


def _variants(a: np.ndarray) -> list[np.ndarray]:
    """Every flip/rotation of an image (the dihedral group)."""
    out = []
    for k in range(4):
        r = np.rot90(a, k)
        out += [r, r[:, ::-1]]
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()


def _leaks(train: list[np.ndarray], held_out: list[np.ndarray]) -> int:
    train_hashes = {_digest(a) for a in train}
    return sum(_digest(v) in train_hashes for a in held_out for v in _variants(a))


def test_slicing_and_expansion_happen_after_the_split(cache: str, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", per_class=8, size=40)
    spec = PreprocessSpec(input_size=(20, 20), resize_mode="stretch", resize=20)  # 20-px tiles kept as is
    d = build_data(cfg(root, cache, slice_grid=(2, 2), expand=("hflip", "vflip", "rot90", "affine")), spec, seed=1)
    # Split membership is by source file: the three splits share no file, and tiles stay with their file.
    members = split_members(d)
    tr, va, te = members["train"], members["val"], members["test"]
    assert not (tr & va or tr & te or va & te)
    assert members["train"] == split_members(d)["train"] == {it.file.path for it in d.train_eval.items}
    n_train_files = len(members["train"])
    assert len(d.train_eval) == 4 * n_train_files and len(d.train) == 5 * 4 * n_train_files  # tiles x (orig + 4)
    assert len(d.val) == 4 * len(members["val"]) and len(d.test) == 4 * len(members["test"])
    assert all(not it.transform for ds in (d.val, d.test) for it in ds.items)  # no expansion outside train
    assert sum(d.class_counts) == len(d.train)
    train = [d.train.resized(i) for i in range(len(d.train))]
    held = [ds.resized(i) for ds in (d.val, d.test) for i in range(len(ds))]
    assert all(a.shape == (20, 20, 3) for a in train + held)
    assert _leaks(train, held) == 0  # no derivative of a val/test image is in train
    # The detector works: the train originals and their flips/rotations are found among train items.
    originals = [d.train_eval.resized(i) for i in range(len(d.train_eval))]
    assert _leaks(train, originals) >= 4 * len(originals)
    # raw(i) is the decoded tile before resizing: a quarter of the 40x40 source file
    raw, _ = d.test.raw(0)
    assert raw.shape == (20, 20, 3) and "#tile=" in d.test.source(0)


def test_max_images_gives_a_stratified_elpv_subset(cache: str, tmp_path: Path) -> None:
    d = build_data(cfg("elpv", cache, max_images=60), SPEC32, run_dir=tmp_path)
    assert d.dataset_name == "elpv-defect4" and d.classes == ["p0", "p033", "p067", "p100"]
    man = json.loads((tmp_path / "split.json").read_text())
    assert 60 <= len(man["files"]) <= 62
    per_class = {c: sum(f["label"] == c for f in man["files"]) for c in d.classes}
    # proportional to 1508/295/106/715 with at least 3 per class so that every split gets one
    assert per_class["p0"] > per_class["p100"] > per_class["p033"] >= per_class["p067"] >= 3
    for s in ("train", "val", "test"):
        assert {f["label"] for f in man["files"] if f["split"] == s} == set(d.classes)
    x, _ = d.test[0]
    assert x.shape == (3, 32, 32)
    raw, _ = d.test.raw(0)
    assert raw.shape == (300, 300, 3) and (raw[..., 0] == raw[..., 2]).all()  # grey cell image as RGB


def test_image_modes_are_converted(cache: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    alpha = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (24, 24), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (24, 24, 3), dtype=np.uint16)
    root = tmp_path / "modes"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    expected: dict[str, tuple[np.ndarray, int]] = {}

    def put(rel: str, exp: np.ndarray, tol: int = 0) -> Path:
        expected[str((root / rel).resolve())] = (exp, tol)
        return root / rel

    Image.fromarray(grey, "L").save(put("a/grey.png", np.stack([grey] * 3, -1)))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(
        put("a/rgba.png", ((rgb.astype(np.float32) * (alpha[..., None] / 255.0)) + 0.5).astype(np.uint8), 1)
    )
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=98)
    put("a/cmyk.jpg", rgb, 40).write_bytes(buf.getvalue())
    cv2.imwrite(str(put("b/grey16.png", np.stack([((g16 / 257.0) + 0.5).astype(np.uint8)] * 3, -1), 1)), g16)
    cv2.imwrite(str(put("b/rgb16.tif", ((rgb16 / 257.0) + 0.5).astype(np.uint8), 1)), rgb16[..., ::-1])
    Image.fromarray(rgb).save(put("b/rgb.bmp", rgb))
    spec = PreprocessSpec(input_size=(24, 24), resize_mode="stretch", resize=24)
    d = build_data(cfg(root, cache, split=(0.34, 0.33, 0.33)), spec)
    assert d.skipped == []
    seen = 0
    for ds in (d.train_eval, d.val, d.test):
        for i in range(len(ds)):
            exp, tol = expected[ds.source(i)]
            raw, _ = ds.raw(i)
            assert raw.dtype == np.uint8 and raw.shape == (24, 24, 3), ds.source(i)
            diff = np.abs(raw.astype(int) - exp.astype(int))
            assert (diff.mean() if tol > 1 else diff.max()) <= (8 if tol > 1 else tol), ds.source(i)
            x, _ = ds[i]
            assert np.array_equal(x.numpy(), spec.normalize(raw))  # loaded tensor = normalised decoded pixels
            seen += 1
    assert seen == 6


def test_csv_manifest_input(cache: str, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", per_class=5)
    rows = [(f"imgs/{p.parent.name}/{p.name}", p.parent.name) for p in sorted(root.rglob("*.png"))]
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(f"{p},{lab}" for p, lab in rows) + "\n")
    d = build_data(cfg(tmp_path / "labels.csv", cache), SPEC32, run_dir=tmp_path / "run")
    assert d.classes == ["brick", "grass", "gravel"] and d.dataset_name == "labels"
    assert len(d.train) + len(d.val) + len(d.test) == 15
    man = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sorted(f["path"] for f in man["files"]) == sorted(p for p, _ in rows)
    # a split column is a predefined split
    with open(tmp_path / "split.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for i, (p, lab) in enumerate(rows):
            w.writerow([p, lab, ("train", "train", "train", "val", "test")[i % 5]])
    d2 = build_data(cfg(tmp_path / "split.csv", cache), SPEC32)
    assert (len(d2.train), len(d2.val), len(d2.test)) == (9, 3, 3)
    (tmp_path / "bad.csv").write_text("file,class\nx.png,a\n")
    with pytest.raises(ConfigError, match="'path' and 'label'"):
        build_data(cfg(tmp_path / "bad.csv", cache), SPEC32)


def test_disk_cache_memmap_and_throughput(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", per_class=8, size=96)
    files, _ = list_image_folder(root)
    items = make_items(hash_files(files), {"brick": 0, "grass": 1, "gravel": 2}, (1, 1))
    spec = PreprocessSpec(input_size=(64, 64), resize=72)
    s1: dict[str, float] = {}
    s2: dict[str, float] = {}
    a = build_store(items, spec, tmp_path / "c", seed=0, cache_images="yes", stats=s1)
    b = build_store(items, spec, tmp_path / "c", seed=0, cache_images="no", stats=s2)
    assert s1["cache_hit"] == 0.0 and s2["cache_hit"] == 1.0
    assert a.in_memory and not b.in_memory
    for i in range(len(items)):
        assert np.array_equal(a.get(i), b.get(i))
    assert not build_store(items, spec, tmp_path / "c", seed=0, cache_images="auto", memory_budget=a.nbytes).in_memory
    assert build_store(items, spec, tmp_path / "c", seed=0, cache_images="auto", memory_budget=a.nbytes + 1).in_memory
    b2 = pickle.loads(pickle.dumps(b))  # a memory-mapped store pickles without its data (DataLoader workers)
    assert len(pickle.dumps(b)) < 10_000 and np.array_equal(b2.get(3), a.get(3))
    # Another spec is another cache entry.
    s3: dict[str, float] = {}
    build_store(items, PreprocessSpec(input_size=(32, 32), resize=36), tmp_path / "c", seed=0, stats=s3)
    assert s3["cache_hit"] == 0.0
    t = decode_throughput(items, spec, a, n=24)
    print(f"decode+resize {t['decode_img_s']:.0f} img/s, cached {t['cached_img_s']:.0f} img/s")
    assert t["cached_img_s"] > 3 * t["decode_img_s"]


def test_prepared_once_trials_do_not_rehash_or_read_test(cache: str, tmp_path: Path, monkeypatch) -> None:
    """A study prepares the dataset once (prepare_source); a trial's build_data from it lists, hashes and
    decodes nothing, and without the test split does not even load it."""
    import trainer.data as data_mod
    from trainer.data import prepare_source

    cfg = DataConfig(dataset="textures", cache_dir=cache, max_images=30)
    spec = PreprocessSpec(input_size=(64, 64), resize=72)
    source = prepare_source(cfg)
    full = build_data(cfg, spec, seed=0, source=source)
    pickle.loads(pickle.dumps(source))  # travels to trials through Ray

    def boom(*a, **k):
        raise AssertionError("a trial re-scanned or re-hashed the dataset")

    for name in ("hash_files", "scan_sources", "resolve_dataset"):
        monkeypatch.setattr(data_mod, name, boom)
    trial = build_data(cfg, spec, seed=0, source=source, with_test=False)
    assert trial.test is None and trial.dataset_hash == full.dataset_hash
    assert [trial.train.source(i) for i in range(len(trial.train))] == [
        full.train.source(i) for i in range(len(full.train))
    ]
    assert trial.train.store.key == full.train.store.key  # the same content key: the activation cache's
    with pytest.raises(EdgetuneError, match="not the one data asks for"):
        build_data(DataConfig(dataset="textures", cache_dir=cache, max_images=20), spec, source=source)
