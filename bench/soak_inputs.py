"""The soak's inputs (``bench/soak.py``): valid images, the hostile payload list (built on
``testkit/hostile_media.py``) and the Hypothesis strategy of fuzzed images and raw protobuf bytes."""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np

FUZZ_FORMATS = [".png", ".jpg", ".webp", ".tiff", ".bmp", ".gif", ".ppm"]


def good_images() -> list[bytes]:
    from testkit.edge_fixtures import texture_tiles

    tiles = texture_tiles("test")[0][::6]
    out = [cv2.imencode(".jpg", t[..., ::-1])[1].tobytes() for t in tiles]
    out.append(cv2.imencode(".jpg", cv2.resize(tiles[0], (640, 480)))[1].tobytes())
    return out


def hostile_payloads(good: bytes) -> list[tuple[str, bytes, int]]:
    from testkit.hostile_media import CRAFTED, oversized, wide_png

    out: list[tuple[str, bytes, int]] = [
        ("wide-png-1x60000", wide_png(60000), 0),
        ("wide-png-1x3000", wide_png(3000), 0),
    ]
    out += [(f"bomb-{fmt}", oversized(fmt, 8192, 8192), 0) for fmt in CRAFTED]
    out += [(f"bomb-{fmt}-16k", oversized(fmt, 16383, 16383), 0) for fmt in ("WebP-lossless", "PNG", "JPEG")]
    tile = np.full((64, 64, 3), 90, np.uint8)
    for ext in (".gif", ".ppm", ".hdr", ".ras"):
        ok, buf = cv2.imencode(ext, tile.astype(np.float32) / 255 if ext == ".hdr" else tile)
        if ok:
            out.append((f"format{ext}", buf.tobytes(), 0))
    out += [
        ("empty", b"", 0),
        ("garbage", os.urandom(512), 0),
        ("truncated-jpeg", good[: len(good) // 3], 0),
        ("top_k-huge", good, 4_000_000_000),
        ("jpeg-header-only", good[:200], 0),
    ]
    big = np.random.default_rng(0).integers(0, 65535, (1400, 1400, 4), dtype=np.uint16)
    out.append(("png-rgba16-1400", cv2.imencode(".png", big)[1].tobytes(), 0))  # allowed: a big honest decode
    out.append(("jpeg-2048x2049", cv2.imencode(".jpg", np.zeros((2049, 2048, 3), np.uint8))[1].tobytes(), 0))
    return out


def _encode(spec: tuple[int, int, int, bool, str, int]) -> bytes:
    """A random image of the given height, width, channels, depth (16 bit if ``deep``), format and seed."""
    h, w, c, deep, ext, seed = spec
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 65535 if deep else 255, (h, w, c) if c > 1 else (h, w), dtype=np.uint16 if deep else np.uint8)
    ok, buf = cv2.imencode(ext, img)
    if not ok:
        ok, buf = cv2.imencode(ext, (img // 257).astype(np.uint8) if deep else img[..., :3] if c > 1 else img)
    return buf.tobytes() if ok else b""


def _mutate(t: tuple[bytes, list[tuple[int, int]], int]) -> bytes:
    """A valid image with some bytes overwritten, truncated one time in three."""
    data, changes, cut = t
    buf = bytearray(data)
    for pos, val in changes:
        buf[pos % len(buf)] = val
    return bytes(buf[: max(1, cut % (len(buf) + 1))]) if cut % 3 == 0 else bytes(buf)


def fuzz_cases(good: list[bytes], methods: list[str]) -> Any:
    """The Hypothesis strategy of one fuzz case, ``(kind, payload, extra, with_token)``: ``("image", bytes,
    top_k, bool)`` (a random or mutated image) or ``("proto", bytes, method, bool)`` (raw bytes to ``method``,
    one of ``methods`` or ``"StreamClassify"``)."""
    from hypothesis import strategies as st

    images = st.tuples(
        st.integers(1, 700),
        st.integers(1, 700),
        st.sampled_from([1, 3, 4]),
        st.booleans(),
        st.sampled_from(FUZZ_FORMATS),
        st.integers(0, 2**16),
    ).map(_encode)
    flips = st.tuples(
        st.sampled_from(good),
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
        st.integers(0, 10**6),
    )
    return st.one_of(
        st.tuples(st.just("image"), st.one_of(images, flips.map(_mutate)), st.integers(0, 5), st.booleans()),
        st.tuples(
            st.just("proto"),
            st.binary(max_size=4096),
            st.sampled_from(sorted(methods) + ["StreamClassify"]),
            st.booleans(),
        ),
    )
