"""``make engine`` on the target reuses the engine the search built there for the winner's bundle (issue 13,
hand-off): only when TensorRT version, GPU, compute capability, ONNX SHA, precision, batch profile and the
engine's own SHA-256 all match. The decision is tested here without TensorRT (real bundles, real sidecars,
the builder's own sidecar writer); building and running engines needs a Jetson and is tested where TensorRT is."""

from __future__ import annotations

from pathlib import Path

from edge_server.engine import build as eng
from edge_server.engine import cache as engine_cache
from edge_server.runners import tensorrt as rt

ORIN = {"tensorrt_version": "10.3.0", "gpu_name": "Orin (nvgpu)", "compute_capability": "8.7"}


def _cache_engine(bundle, cache: Path, system=ORIN, precision="fp16", options=None, data=b"serialized engine"):
    options = options or engine_cache.BuildOptions(precision=precision)
    shapes = eng.profile_shapes(
        (-1, 3, *bundle.spec.input_size), bundle.spec.input_size, options.max_batch, options.opt
    )
    path = cache / rt.engine_path(bundle, precision, system).name
    rt.write_engine_files(
        path,
        data,
        engine_cache.make_sidecar(
            bundle, system, precision, shapes, options, data, build_seconds=42.0, built_by="edgetune timing"
        ),
    )
    return path, shapes


def test_engine_from_the_search_is_reused_when_everything_matches(loaded_bundle, tmp_path):
    path, shapes = _cache_engine(loaded_bundle, tmp_path)
    got = engine_cache.cached_engine(loaded_bundle, ORIN, "fp16", engine_cache.BuildOptions(precision="fp16"), tmp_path)
    assert got is not None
    data, got_shapes, facts = got
    assert data == b"serialized engine" and got_shapes == shapes
    assert facts["reused_from"] == str(path) and facts["reused_build_seconds"] == 42.0


def test_engine_not_reused_on_any_mismatch(loaded_bundle, bundle_dir_b, tmp_path):
    from edgetune.bundle import load_bundle

    opts = engine_cache.BuildOptions(precision="fp16")
    path, _ = _cache_engine(loaded_bundle, tmp_path)
    for system in ({**ORIN, "tensorrt_version": "10.4.0"}, {**ORIN, "compute_capability": "7.2"}):
        assert engine_cache.cached_engine(loaded_bundle, system, "fp16", opts, tmp_path) is None
    assert (
        engine_cache.cached_engine(loaded_bundle, ORIN, "fp32", engine_cache.BuildOptions(precision="fp32"), tmp_path)
        is None
    )
    assert (
        engine_cache.cached_engine(
            loaded_bundle, ORIN, "fp16", engine_cache.BuildOptions(precision="fp16", max_batch=16), tmp_path
        )
        is None
    )
    other = load_bundle(bundle_dir_b)  # other weights -> other ONNX SHA
    assert engine_cache.cached_engine(other, ORIN, "fp16", opts, tmp_path) is None
    # the name matches but the sidecar says another GPU (a copied-in engine): refused
    side = rt.sidecar_path(path)
    side.write_text(side.read_text().replace("Orin (nvgpu)", "Xavier"))
    assert engine_cache.cached_engine(loaded_bundle, ORIN, "fp16", opts, tmp_path) is None


def test_tampered_cached_engine_is_not_reused(loaded_bundle, tmp_path):
    opts = engine_cache.BuildOptions(precision="fp16")
    path, _ = _cache_engine(loaded_bundle, tmp_path)
    path.write_bytes(b"serialized enginX")
    assert engine_cache.cached_engine(loaded_bundle, ORIN, "fp16", opts, tmp_path) is None
