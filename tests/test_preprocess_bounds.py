"""Bounded work per image in the shared preprocessing (issue 11, findings 1 and 2).

Finding 1: a tiny 1x60000 PNG was resized so that its shorter side reached the input size (an
intermediate of 6.6 M x 110 pixels, GBs of RSS). ``resize_image`` (every resize mode), ``apply``
(resize + crop) and ``decode_image`` now bound the aspect ratio and the intermediate size.

Finding 2: the pixel limit was read from the header only for PNG; a 38-byte WebP declaring
4096x4096 decoded to 48 MB before it was refused. ``read_image_header`` reads width/height of
every accepted format (JPEG, PNG, WebP, TIFF, BMP) and ``decode_image`` refuses an oversized image
before OpenCV sees it; every other format is refused with the list of accepted ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetune import imagedecode
from edgetune.errors import ImageDecodeError
from edgetune.imagedecode import decode_image
from edgetune.imageheader import ACCEPTED_FORMATS, read_image_header
from edgetune.preprocess import MAX_ASPECT_RATIO, MAX_RESIZE_PIXELS, PreprocessSpec
from testkit.hostile_media import CRAFTED, EXT, encode, oversized, patch_webp_lossless, tiff_bytes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def imdecode_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Records every cv2.imdecode call (the real decoder still runs)."""
    calls: list[tuple[int, ...]] = []
    real = cv2.imdecode

    def spy(buf, flags):  # type: ignore[no-untyped-def]
        calls.append(tuple(np.asarray(buf).shape))
        return real(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", spy)
    return calls


def test_accepted_formats_are_listed_exactly() -> None:
    assert ACCEPTED_FORMATS == ("JPEG", "PNG", "WebP", "TIFF", "BMP")


# -- finding 2: dimensions from the header of every accepted format ---------------------------


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(sorted(EXT)),
    h=st.integers(1, 300),
    w=st.integers(1, 300),
    channels=st.sampled_from([1, 3, 4]),
    seed=st.integers(0, 2**16),
)
def test_header_dimensions_match_the_decoded_image(fmt: str, h: int, w: int, channels: int, seed: int) -> None:
    if fmt == "JPEG" and channels == 4:
        channels = 3  # JPEG has no alpha
    img = np.random.default_rng(seed).integers(0, 256, (h, w, channels) if channels > 1 else (h, w), np.uint8)
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if fmt == "WebP" and seed % 2 else []
    data = encode(fmt, img, params)
    head = read_image_header(data)
    assert (head.format, head.width, head.height) == (fmt, w, h)
    decoded = decode_image(data)
    assert decoded.shape == (h, w, 3)
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert head.width * head.height * head.channels * head.bytes_per_sample >= raw.nbytes  # an upper bound


ALL_CRAFTED = list(CRAFTED)


@pytest.mark.parametrize("fmt", ALL_CRAFTED)
def test_crafted_headers_are_read(fmt: str) -> None:
    head = read_image_header(oversized(fmt, 3000, 2000))
    assert (head.width, head.height) == (3000, 2000)
    assert head.format == fmt.split("-")[0].replace("BigTIFF", "TIFF")


@pytest.mark.parametrize("fmt", ALL_CRAFTED)
def test_oversized_image_is_refused_before_decoding(fmt: str, imdecode_calls: list) -> None:
    data = oversized(fmt, 5000, 4000)
    assert len(data) < 2000  # a few hundred bytes that would decode to 20 M pixels
    with pytest.raises(ImageDecodeError, match="5000x4000 exceeds 1000000 pixels"):
        decode_image(data, max_pixels=1_000_000)
    assert imdecode_calls == [], f"{fmt}: OpenCV decoded an image whose header was already too large"


def test_tiff_tile_larger_than_the_image_is_refused(imdecode_calls: list) -> None:
    """OpenCV allocates a whole tile: a 1x1 TIFF with a 16000x16000 tile would take 1 GB."""
    with pytest.raises(ImageDecodeError, match="tile 16000x16000 is larger than its 1x1 image"):
        decode_image(tiff_bytes(1, 1, tile=(16000, 16000)))
    assert imdecode_calls == []
    assert read_image_header(tiff_bytes(100, 100, tile=(256, 256))).width == 100  # ordinary tiles are fine


def test_webp_bomb_memory_stays_small() -> None:
    """A 38-byte lossless WebP declaring 8192x8192 (67 M pixels): refused with < 40 MB peak RSS growth."""
    bomb = patch_webp_lossless(
        encode("WebP", np.full((16, 16, 3), 77, np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 101]), 8192, 8192
    )
    code = f"""
import json, sys
import numpy as np, cv2
from edgetune.errors import ImageDecodeError
from edgetune.imagedecode import decode_image
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) // 1024
decode_image(cv2.imencode('.png', np.zeros((8, 8, 3), np.uint8))[1].tobytes())  # warm up OpenCV
before = hwm()
try:
    decode_image(bytes.fromhex({bomb.hex()!r}), max_pixels=16 * 1024 * 1024)
    out = "accepted"
except ImageDecodeError as e:
    out = str(e)
print(json.dumps({{"grew_mb": hwm() - before, "result": out}}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert "8192x8192 exceeds" in res["result"]
    assert res["grew_mb"] < 40, res


@pytest.mark.parametrize("ext", [".ppm", ".pam", ".pfm", ".hdr", ".ras", ".gif", ".avif"])
def test_other_formats_are_refused_clearly(ext: str, imdecode_calls: list) -> None:
    img = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    if ext in (".pfm", ".hdr"):
        img = img.astype(np.float32) / 255
    ok, buf = cv2.imencode(ext, img)
    if not ok:
        pytest.skip(f"this OpenCV cannot encode {ext}")
    with pytest.raises(ImageDecodeError, match="not a decodable image.*accepted formats: JPEG, PNG, WebP, TIFF, BMP"):
        decode_image(buf.tobytes())
    assert imdecode_calls == []


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n\0\0",
        b"\xff\xd8\xff\xe0\0\x10JFIF",
        b"RIFF\0\0\0\0WEBPVP8L",
        b"II*\0\xff\xff\xff\x7f",
        b"BM\0\0\0\0",
    ],
)
def test_truncated_headers_are_invalid_not_crashes(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(
        [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBP", b"II*\0", b"MM\0*", b"II+\0", b"BM", b""]
    ),
    tail=st.binary(max_size=300),
)
def test_fuzzed_headers_never_raise_anything_else(prefix: bytes, tail: bytes) -> None:
    try:
        head = read_image_header(prefix + tail)
    except ImageDecodeError:
        return
    assert head.width >= 1 and head.height >= 1 and head.format in ACCEPTED_FORMATS


# -- finding 1: aspect ratio and intermediate size on every path ------------------------------

SPECS = [
    PreprocessSpec(input_size=(8, 8), resize=8, interpolation=i) for i in ("bilinear", "area", "bicubic", "nearest")
]
SPECS += [PreprocessSpec(input_size=(8, 8), resize=8, resize_mode="stretch")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.resize_mode}-{s.interpolation}")
@pytest.mark.parametrize("shape", [(1, 60000, 3), (60000, 1, 3), (2, 200, 3)])
def test_extreme_aspect_ratio_is_refused_on_every_path(spec: PreprocessSpec, shape: tuple[int, int, int]) -> None:
    img = np.zeros(shape, np.uint8)
    for step in (spec.resize_image, spec.apply):
        with pytest.raises(ImageDecodeError, match="aspect ratio"):
            step(img)
    with pytest.raises(ImageDecodeError, match="aspect ratio"):
        spec.apply_batch([np.zeros((8, 8, 3), np.uint8), img])


def test_the_1x60000_png_is_refused_from_its_header(imdecode_calls: list) -> None:
    ok, buf = cv2.imencode(".png", np.zeros((1, 60000, 3), np.uint8))
    assert ok and len(buf) < 1000
    with pytest.raises(ImageDecodeError, match=r"60000x1 .*aspect ratio 60000:1 exceeds .*32:1"):
        decode_image(buf.tobytes(), max_aspect_ratio=MAX_ASPECT_RATIO)
    assert imdecode_calls == []
    assert decode_image(buf.tobytes()).shape == (1, 60000, 3)  # the trainer tiles wide images: decode alone is fine
    spec = PreprocessSpec(input_size=(224, 224), resize=256)
    with pytest.raises(ImageDecodeError, match="aspect ratio"):
        spec.apply(decode_image(buf.tobytes()))


@settings(max_examples=80, deadline=None)
@given(
    h=st.integers(1, 2500),
    w=st.integers(1, 2500),
    size=st.integers(8, 64),
    extra=st.integers(0, 40),
    mode=st.sampled_from(["shorter_side", "stretch"]),
)
def test_resize_output_is_bounded_or_refused(h: int, w: int, size: int, extra: int, mode: str) -> None:
    spec = PreprocessSpec(input_size=(size, size), resize=size + extra, resize_mode=mode)
    img = np.zeros((h, w, 3), np.uint8)
    try:
        out = spec.resize_image(img)
    except ImageDecodeError as e:
        assert max(h, w) / min(h, w) > MAX_ASPECT_RATIO, (h, w, str(e))
        return
    assert max(h, w) / min(h, w) <= MAX_ASPECT_RATIO
    assert out.shape[0] * out.shape[1] <= min(MAX_RESIZE_PIXELS, spec.resize**2 * MAX_ASPECT_RATIO + 4 * spec.resize)
    assert spec.apply(img).shape == (3, size, size)


def test_resize_unchanged_for_ordinary_images() -> None:
    """The bounds do not change what the trainer and the server compute for ordinary images."""
    rng = np.random.default_rng(1)
    for h, w in [(480, 640), (37, 37), (100, 3000), (3000, 100), (5, 7)]:
        img = rng.integers(0, 256, (h, w, 3), np.uint8)
        spec = PreprocessSpec(input_size=(32, 32), resize=37, interpolation="bicubic")
        scale = 37 / min(h, w)
        th, tw = max(32, round(h * scale)), max(32, round(w * scale))
        ref = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC)
        assert np.array_equal(spec.resize_image(img), ref)


def test_pixel_conversions_unchanged_and_lean() -> None:
    """16-bit, float and RGBA images convert exactly as before (without float copies of the whole image)."""
    rng = np.random.default_rng(2)
    u16 = rng.integers(0, 65536, (50, 60, 3), dtype=np.uint16)
    np.testing.assert_array_equal(
        imagedecode._to_rgb_uint8(u16, "x"),
        cv2.cvtColor((u16.astype(np.float32) / 257.0 + 0.5).astype(np.uint8), cv2.COLOR_BGR2RGB),
    )
    f32 = rng.normal(3, 5, (40, 30)).astype(np.float32)
    lo, hi = float(f32.min()), float(f32.max())
    ref = ((f32 - lo) * (255.0 / (hi - lo)) + 0.5).astype(np.uint8)
    got = imagedecode._to_rgb_uint8(f32.copy(), "x")
    assert np.abs(got[..., 0].astype(int) - ref.astype(int)).max() <= 1 and (got[..., 0] == got[..., 2]).all()
    for bad in (np.nan, np.inf, -np.inf):  # issue 21: NaN/Inf pixels are refused, not classified
        f = f32.copy()
        f[3, 4] = bad
        with pytest.raises(ImageDecodeError, match="NaN or infinite"):
            imagedecode._to_rgb_uint8(f, "x")
    bgra = rng.integers(0, 256, (33, 44, 4), dtype=np.uint8)
    rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB).astype(np.float32)
    ref = (rgb * (bgra[..., 3:4].astype(np.float32) / 255.0) + 0.5).astype(np.uint8)
    assert np.abs(imagedecode._to_rgb_uint8(bgra, "x").astype(int) - ref.astype(int)).max() <= 1
