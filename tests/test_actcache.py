"""Frozen-prefix activation cache: parity with the live forward at every cut, hits, key parts, memory bound."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.trainer_fixtures import tiny_config
from trainer.actcache import VIEWS, ActivationCache, ActKey, apply_view, prefix_fingerprint
from trainer.augment import view_chw
from trainer.data import build_data
from trainer.feeds import _activations, make_feeds, view_tensor
from trainer.model import create_model, freeze_backbone, preprocess_spec_for


@pytest.fixture(scope="module")
def tex():
    cfg = tiny_config(**{"data.max_images": 24, "model.img_size": 64})
    return cfg, build_data(cfg.data, preprocess_spec_for(cfg.model), seed=0)


def _images(ds, view: str = "id") -> torch.Tensor:
    return torch.from_numpy(np.stack([view_tensor(ds.spec, ds.resized(i), view) for i in range(len(ds))]))


@pytest.mark.parametrize(
    "backbone,weights", [("efficientnet_lite0", "imagenet"), ("resnet18", "none"), ("mobilenet_v2", "none")]
)
def test_cached_and_live_forward_agree_at_every_cut(tex, tmp_path, backbone, weights):
    cfg, data = tex
    torch.manual_seed(0)
    model = create_model(cfg.model.__class__(backbone=backbone, weights=weights, img_size=64), len(data.classes))
    model.eval()
    cache = ActivationCache(tmp_path, memory_bytes=1 << 30)
    for view in ("id", "rot90"):
        x = _images(data.val, view)
        with torch.no_grad():
            live = model(x)
        cuts = model.cut_points()
        assert [c.index for c in cuts] == list(range(len(model.stages()) + 1))
        for c in cuts:
            model.cut = c.index
            acts = _activations(
                model, data.val, view, cache, prefix_fingerprint(model.stages(), c.index), allow_fp16=False
            )
            model.input_cut = c.index
            with torch.no_grad():
                cached = model(torch.from_numpy(np.asarray(acts, dtype=np.float32)))
            model.input_cut = 0
            assert acts.dtype == np.float32
            assert torch.allclose(cached, live, atol=1e-5, rtol=0), (backbone, view, c, (cached - live).abs().max())


def test_views_match_the_live_augmentation_ops():
    img = np.random.default_rng(0).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    chw = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    for v in VIEWS:
        want = np.ascontiguousarray(apply_view(img, v)).transpose(2, 0, 1)
        assert np.array_equal(view_chw(chw, v).numpy(), want), v
    assert len({apply_view(img, v).tobytes() for v in VIEWS}) == 8  # eight distinct dihedral views


def _feeds(cfg, data, **over):
    c = cfg.replace({"data.augment": "flips", "model.freeze": 0.5, **over})
    model = create_model(c.model, len(data.classes))
    return model, make_feeds(c, model, data)


def test_second_run_with_the_same_cut_hits_the_cache_and_key_parts_miss(tex, tmp_path):
    cfg, data = tex
    cfg = cfg.replace({"data.cache_dir": str(tmp_path)})
    _, f1 = _feeds(cfg, data)
    assert f1.path == "cached" and f1.cache_stats["builds"] == 5  # 4 flip views of train + val
    import trainer.feeds as feeds_mod

    feeds_mod._CACHES.clear()  # a new trial process: nothing in memory
    _, f2 = _feeds(cfg, data)
    assert f2.cache_stats["builds"] == 0 and f2.cache_stats["disk_hits"] == 5
    _, f3 = _feeds(cfg, data)  # same process again: from memory
    assert f3.cache_stats["memory_hits"] == 5 and f3.cache_stats["builds"] == 0
    # every key part changes the key
    base = ActKey(items="a", backbone="b", prefix="c", spec="d", cut=3, view="id")
    for field in ("items", "backbone", "prefix", "spec", "view", "dtype"):
        assert ActKey(**{**base.__dict__, field: "x"}).digest() != base.digest()
    assert ActKey(**{**base.__dict__, "cut": 4}).digest() != base.digest()
    # ... and the real changes that feed them miss: another cut, other weights (seed), another input size
    _, f4 = _feeds(cfg, data, **{"model.freeze": 0.25})
    assert f4.cache_stats["builds"] == 5
    torch.manual_seed(1)
    _, f5 = _feeds(cfg, data, **{"model.weights": "none"})
    torch.manual_seed(2)
    _, f6 = _feeds(cfg, data, **{"model.weights": "none"})
    assert f5.cache_stats["builds"] == 5 and f6.cache_stats["builds"] == 5
    _, f7 = _feeds(cfg, data, **{"data.activation_dtype": "float32"})  # an fp16 array is not served as float32
    assert f7.cache_stats["builds"] == 5
    cfg96 = cfg.replace({"model.img_size": 96})
    data96 = build_data(cfg96.data, preprocess_spec_for(cfg96.model), seed=0)
    _, f7 = _feeds(cfg96, data96)
    assert f7.cache_stats["builds"] == 5
    metas = [json.loads(p.read_text()) for p in (tmp_path / "activations").glob("*.json")]
    assert len(metas) == 30 and {m["key"]["cut"] for m in metas} >= {9, 5}


def test_memory_bound_holds(tmp_path):
    cache = ActivationCache(tmp_path, memory_bytes=3 * 4000)
    arr = np.arange(1000, dtype=np.float32)

    def build():
        yield arr[:, None]

    for i in range(5):
        cache.get(ActKey("i", "b", "p", "s", i, "id"), build, 1000)
        assert cache.resident_bytes <= 3 * 4000
    assert cache.stats.builds == 5 and cache.stats.evictions == 2
    again = cache.get(ActKey("i", "b", "p", "s", 0, "id"), build, 1000)  # evicted: read back from disk
    assert cache.stats.disk_hits == 1 and np.array_equal(again[:, 0], arr)
    assert not isinstance(again, np.memmap) and again.base is None  # resident: a copy in RAM, not a view of the file
    big = ActivationCache(tmp_path / "big", memory_bytes=100)
    out = big.get(ActKey("i", "b", "p", "s", 0, "id"), build, 1000)
    assert isinstance(out, np.memmap) and big.resident_bytes == 0 and big.stats.mapped == 1


def test_fp16_only_where_parity_holds(tex, tmp_path):
    cfg, data = tex
    cfg = cfg.replace({"data.cache_dir": str(tmp_path), "data.augment": "none", "model.freeze": 0.5})
    model = create_model(cfg.model, len(data.classes))
    f = make_feeds(cfg, model, data)
    assert f.cache_stats["dtype"] == "float16"  # ReLU6-bounded Lite activations round within tolerance
    c = ActivationCache(tmp_path / "x")
    huge = np.full((4, 3), 70000.0, dtype=np.float32)  # beyond float16's range: parity fails
    got = c.get(
        ActKey("i", "b", "p", "s", 0, "id"),
        lambda: iter([huge]),
        4,
        fp16_ok=lambda b: bool(np.allclose(b.astype(np.float16).astype(np.float32), b, rtol=1e-3)),
    )
    assert got.dtype == np.float32


def test_live_path_for_random_augmentation_and_full_fine_tuning(tex):
    cfg, data = tex
    for over, why in (({"data.augment": "rock"}, "random per step"), ({"model.freeze": 0.0}, "nothing frozen")):
        c = cfg.replace(over)
        model = create_model(c.model, len(data.classes))
        f = make_feeds(c, model, data)
        assert f.path == "live" and why in f.reason


def test_freeze_is_a_block_boundary():
    from trainer.config import ModelConfig

    model = create_model(ModelConfig(backbone="efficientnet_lite0", weights="none", img_size=64), 3)
    rep = freeze_backbone(model, 0.25)
    assert rep["cut"] == 5 and rep["cut_after"] == "blocks.3"  # stem + the first 4 of 16 blocks
    frozen = {id(p) for st in model.stages()[:5] for p in st.parameters()}
    assert all((id(p) in frozen) == (not p.requires_grad) for p in model.backbone.parameters())
    model.train()
    # the backbone's own modules with state (stages only reference them; the stateless ReLU6 is shared)
    real = {id(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert all(not m.training for st in model.stages()[:5] for m in st.modules() if id(m) in real)
    assert all(m.training for st in model.stages()[5:] for m in st.modules() if id(m) in real)
    assert freeze_backbone(model, 1.0)["cut"] == len(model.stages())
