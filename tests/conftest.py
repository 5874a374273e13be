"""Fixtures shared by the test modules: the test bundles, built once per test process.

``bundle_dir`` and ``bundle_dir_b`` are read-only by contract: every test that writes into a bundle takes
``bundle_copy`` (or copies one with :func:`testkit.edge_fixtures.copy_bundle` into its ``tmp_path``). At the end
of the session the shared directories are compared with their state when built, so a test that wrote into
one fails the run instead of leaking into the tests after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from edgetune.bundle import Bundle
    from testkit.edge_fixtures import CliServer


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@contextmanager
def _shared_bundle(seed: int) -> Iterator[Path]:
    from testkit.edge_fixtures import cached_test_bundle

    path = cached_test_bundle(seed=seed)
    before = _snapshot(path)
    yield path
    after = _snapshot(path)
    if after != before:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        pytest.fail(
            f"a test wrote into the shared test bundle {path} (changed: {changed}); tests that modify a "
            "bundle must take the bundle_copy fixture or copy_bundle() it into tmp_path",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def bundle_dir() -> Iterator[Path]:
    """The shared seed-0 test bundle directory (real trained model, real ONNX export). Do not write into it."""
    with _shared_bundle(seed=0) as path:
        yield path


@pytest.fixture(scope="session")
def bundle_dir_b(bundle_dir: Path) -> Iterator[Path]:
    """A second shared test bundle (seed 1): same labels and spec, other weights, hence another model_version."""
    from edgetune.bundle import load_bundle

    with _shared_bundle(seed=1) as path:
        assert load_bundle(path).version != load_bundle(bundle_dir).version, "seed 0 and seed 1 bundles are equal"
        yield path


@pytest.fixture()
def loaded_bundle(bundle_dir: Path) -> Bundle:
    """``load_bundle(bundle_dir)``, a fresh object per test (``Bundle.meta`` is a mutable dict)."""
    from edgetune.bundle import load_bundle

    return load_bundle(bundle_dir)


@pytest.fixture()
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Bundle:
    """A loaded private copy of the seed-0 bundle in ``tmp_path``, for tests that modify a bundle."""
    from edgetune.bundle import load_bundle
    from testkit.edge_fixtures import copy_bundle

    return load_bundle(copy_bundle(bundle_dir, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def good_png() -> bytes:
    """One real texture tile as PNG bytes (the server tests' well-formed image)."""
    from testkit.edge_fixtures import encode_png, texture_tiles

    return encode_png(texture_tiles("test")[0][0])


@pytest.fixture(scope="module")
def cli(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    """The server CLI (``python -m edge_server``) on ``bundle_dir``, one per test module, logging to a file."""
    from testkit.edge_fixtures import CliServer

    srv = CliServer(
        ["--bundle", str(bundle_dir), "--port", "0", "--threads", "1"], tmp_path_factory.mktemp("cli") / "server.log"
    )
    yield srv
    srv.stop()
