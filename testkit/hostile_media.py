"""Hostile images for the tests and the soak (issue 11): tiny files whose headers declare huge images.

``oversized(fmt, w, h)`` patches a real 16x16 image of format ``fmt`` (see :data:`CRAFTED`) so that its
header declares ``w`` x ``h`` pixels; ``tiff_bytes`` writes a minimal TIFF/BigTIFF by hand; ``wide_png``
is the 1 x N black PNG of finding 1.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

EXT = {"PNG": ".png", "JPEG": ".jpg", "WebP": ".webp", "TIFF": ".tiff", "BMP": ".bmp"}
CRAFTED = ("PNG", "JPEG", "BMP", "WebP-lossless", "WebP-lossy", "TIFF", "TIFF-be", "BigTIFF")


def encode(fmt: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(EXT[fmt], img, params or [])
    if not ok:
        raise RuntimeError(f"OpenCV cannot encode {fmt}")
    return buf.tobytes()


def wide_png(n: int = 60000) -> bytes:
    """The PNG encoding of a 1 x ``n`` black image (a few hundred bytes)."""
    return encode("PNG", np.zeros((1, n, 3), np.uint8))


def patch_png(data: bytes, w: int, h: int) -> bytes:
    return data[:16] + struct.pack(">II", w, h) + data[24:]


def patch_jpeg(data: bytes, w: int, h: int) -> bytes:
    i = data.index(b"\xff\xc0")  # baseline SOF0
    return data[: i + 5] + struct.pack(">HH", h, w) + data[i + 9 :]


def patch_bmp(data: bytes, w: int, h: int) -> bytes:
    return data[:18] + struct.pack("<ii", w, h) + data[26:]


def patch_webp_lossless(data: bytes, w: int, h: int) -> bytes:
    i = data.index(b"VP8L")
    bits = int.from_bytes(data[i + 9 : i + 13], "little")
    bits = (w - 1) | ((h - 1) << 14) | (bits & ~((1 << 28) - 1))
    return data[: i + 9] + bits.to_bytes(4, "little") + data[i + 13 :]


def patch_webp_lossy(data: bytes, w: int, h: int) -> bytes:
    i = data.index(b"VP8 ")
    j = i + 8 + 6  # chunk payload: 3-byte frame tag, 3-byte start code, then 14-bit width / height
    return data[:j] + struct.pack("<HH", w, h) + data[j + 4 :]


def tiff_bytes(
    w: int,
    h: int,
    data: bytes = b"\0" * 16,
    big_endian: bool = False,
    bigtiff: bool = False,
    spp: int = 1,
    bits: int = 8,
    tile: tuple[int, int] | None = None,
) -> bytes:
    """A minimal uncompressed TIFF (or BigTIFF) declaring ``w`` x ``h`` with ``data`` as its only strip."""
    e = ">" if big_endian else "<"
    tags = [
        (256, 4, w),
        (257, 4, h),
        (258, 3, bits),
        (259, 3, 1),
        (262, 3, 1 if spp == 1 else 2),
        (273, 4, 0),
        (277, 3, spp),
        (278, 4, h),
        (279, 4, len(data)),
    ]
    if tile is not None:
        tags += [(322, 4, tile[0]), (323, 4, tile[1])]
    if bigtiff:
        head = (b"MM" if big_endian else b"II") + struct.pack(e + "HHHQ", 43, 8, 0, 16)
        ifd_size = 8 + 20 * len(tags) + 8
        strip_at = 16 + ifd_size
        ifd = struct.pack(e + "Q", len(tags))
        for tag, typ, val in tags:
            val = strip_at if tag == 273 else val
            ifd += (
                struct.pack(e + "HHQQ", tag, 16 if typ == 4 else typ, 1, val)
                if typ == 4
                else struct.pack(e + "HHQH6x", tag, typ, 1, val)
            )
        return head + ifd + struct.pack(e + "Q", 0) + data
    head = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8)
    ifd_size = 2 + 12 * len(tags) + 4
    strip_at = 8 + ifd_size
    ifd = struct.pack(e + "H", len(tags))
    for tag, typ, val in tags:
        val = strip_at if tag == 273 else val
        ifd += struct.pack(e + "HHII", tag, typ, 1, val) if typ == 4 else struct.pack(e + "HHIH2x", tag, typ, 1, val)
    return head + ifd + struct.pack(e + "I", 0) + data


def oversized(fmt: str, w: int, h: int) -> bytes:
    small = np.full((16, 16, 3), 77, np.uint8)
    if fmt == "PNG":
        return patch_png(encode("PNG", small), w, h)
    if fmt == "JPEG":
        return patch_jpeg(encode("JPEG", small), w, h)
    if fmt == "BMP":
        return patch_bmp(encode("BMP", small), w, h)
    if fmt == "WebP-lossless":
        return patch_webp_lossless(encode("WebP", small, [cv2.IMWRITE_WEBP_QUALITY, 101]), w, h)
    if fmt == "WebP-lossy":
        return patch_webp_lossy(encode("WebP", small, [cv2.IMWRITE_WEBP_QUALITY, 80]), w, h)
    if fmt == "TIFF":
        return tiff_bytes(w, h)
    if fmt == "TIFF-be":
        return tiff_bytes(w, h, big_endian=True)
    if fmt == "BigTIFF":
        return tiff_bytes(w, h, bigtiff=True)
    raise AssertionError(fmt)
