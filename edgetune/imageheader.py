"""Image headers: width, height and sample layout of an encoded image, read before decoding (no torch).

:func:`read_image_header` parses exactly the :data:`ACCEPTED_FORMATS` (JPEG, PNG, WebP, TIFF, BMP) and
refuses every other format naming the accepted ones, so that :func:`edgetune.imagedecode.decode_image`
can refuse an oversized image before OpenCV allocates anything for it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from edgetune.errors import ImageDecodeError

#: The encoded formats :func:`edgetune.imagedecode.decode_image` accepts (header parsed before decoding);
#: all others are refused.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WebP", "TIFF", "BMP")


@dataclass(frozen=True)
class ImageHeader:
    """What an encoded image declares before it is decoded.

    ``channels`` and ``bytes_per_sample`` are upper bounds of what ``cv2.imdecode(IMREAD_UNCHANGED)``
    produces (palette images count as 4 channels), so ``decoded_bytes`` bounds the decoder's output.
    """

    format: str
    width: int
    height: int
    channels: int = 3
    bytes_per_sample: int = 1
    #: EXIF orientation (1-8; 1 = as stored) of a JPEG from its APP1 segment: how a viewer turns the pixels
    orientation: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * self.channels * self.bytes_per_sample


_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_MAX_SIDE = 1 << 20  # no accepted decoder goes beyond this; larger header values are corrupt or hostile


def read_image_header(data: bytes | bytearray | memoryview | np.ndarray, source: str = "<bytes>") -> ImageHeader:
    """Width, height, channels and sample size from the header of a JPEG, PNG, WebP, TIFF or BMP.

    Reads only the header (for JPEG: the markers up to the first frame header). Raises
    :class:`ImageDecodeError` for other formats (naming the accepted ones) and for truncated or
    inconsistent headers.
    """
    if isinstance(data, np.ndarray):
        buf = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    else:
        buf = memoryview(data).cast("B")  # no copy of the image data
    if len(buf) == 0:
        raise ImageDecodeError(f"{source}: empty image data")
    kind = "image"
    try:
        if bytes(buf[:8]) == _PNG_SIG:
            kind = "PNG"
            head = _png_header(buf)
        elif bytes(buf[:3]) == b"\xff\xd8\xff":
            kind = "JPEG"
            head = _jpeg_header(buf)
        elif bytes(buf[:4]) == b"RIFF" and bytes(buf[8:12]) == b"WEBP":
            kind = "WebP"
            head = _webp_header(buf)
        elif bytes(buf[:4]) in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            kind = "TIFF"
            head = _tiff_header(buf)
        elif bytes(buf[:2]) == b"BM":
            kind = "BMP"
            head = _bmp_header(buf)
        else:
            raise ImageDecodeError(
                f"{source}: not a decodable image (unrecognised format; accepted formats: "
                f"{', '.join(ACCEPTED_FORMATS)})"
            )
    except _HeaderError as e:
        raise ImageDecodeError(f"{source}: {e}") from None
    except (struct.error, IndexError, OverflowError):
        raise ImageDecodeError(f"{source}: truncated or corrupt {kind} header") from None
    if not (1 <= head.width <= _MAX_SIDE and 1 <= head.height <= _MAX_SIDE):
        raise ImageDecodeError(f"{source}: {head.format} header declares an impossible size {head.width}x{head.height}")
    return head


class _HeaderError(ValueError):
    """A header problem; :func:`read_image_header` adds the source name."""


def _png_header(b: memoryview) -> ImageHeader:
    if len(b) < 33 or bytes(b[12:16]) != b"IHDR":
        raise _HeaderError("truncated PNG header (no IHDR chunk)")
    w, h = struct.unpack(">II", b[16:24])
    depth, color = b[24], b[25]
    channels = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}.get(color)
    if channels is None:
        raise _HeaderError(f"PNG header has an invalid colour type {color}")
    return ImageHeader("PNG", w, h, channels, 2 if depth == 16 else 1)


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


_JPEG_MAX_SEGMENTS = 1024  # real files have a few dozen before the frame header


def _exif_orientation(seg: memoryview) -> int:
    """The Orientation tag (0x0112) of IFD0 in an APP1 ``Exif`` segment's payload; 1 when absent or invalid."""
    if bytes(seg[:6]) != b"Exif\x00\x00" or len(seg) < 14:
        return 1
    t = seg[6:]
    order = {b"II": "<", b"MM": ">"}.get(bytes(t[:2]))
    if order is None:
        return 1
    (ifd,) = struct.unpack(order + "I", t[4:8])
    if ifd + 2 > len(t):
        return 1
    (count,) = struct.unpack(order + "H", t[ifd : ifd + 2])
    for k in range(min(count, (len(t) - ifd - 2) // 12)):  # bounded by the segment (at most 64 KB)
        e = ifd + 2 + 12 * k
        tag, typ = struct.unpack(order + "HH", t[e : e + 4])
        if tag == 0x0112 and typ == 3:
            (value,) = struct.unpack(order + "H", t[e + 8 : e + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def _jpeg_header(b: memoryview) -> ImageHeader:
    i = 2
    n = len(b)
    orientation = 1
    for _ in range(_JPEG_MAX_SEGMENTS):
        if i + 4 > n:
            break
        if b[i] != 0xFF:
            raise _HeaderError("corrupt JPEG (marker expected)")
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            break  # end of image / start of scan before any frame header
        (length,) = struct.unpack(">H", b[i + 2 : i + 4])
        if length < 2:
            raise _HeaderError("corrupt JPEG (bad segment length)")
        if marker in _JPEG_SOF:
            precision, h, w, comps = struct.unpack(">BHHB", b[i + 4 : i + 10])
            if h == 0:
                raise _HeaderError("JPEG without a height in its frame header (DNL) is not supported")
            return ImageHeader("JPEG", w, h, max(1, comps), 2 if precision > 8 else 1, orientation)
        if marker == 0xE1 and orientation == 1:
            orientation = _exif_orientation(b[i + 4 : i + 2 + length])
        i += 2 + length
    else:
        raise _HeaderError(f"corrupt JPEG (more than {_JPEG_MAX_SEGMENTS} segments before the frame header)")
    raise _HeaderError("truncated JPEG (no frame header)")


def _webp_header(b: memoryview) -> ImageHeader:
    """The size from the first chunk, which the WebP container requires to be ``VP8 `` / ``VP8L`` (simple) or
    ``VP8X`` (extended: it carries the canvas size): O(1), unlike a walk over chunks (a 15.5 MB file of empty
    chunks cost 4 s of Python per request)."""
    i = 12
    if i + 8 <= len(b):
        tag = bytes(b[i : i + 4])
        p = i + 8
        if tag == b"VP8X":
            w = 1 + int.from_bytes(b[p + 4 : p + 7], "little")
            h = 1 + int.from_bytes(b[p + 7 : p + 10], "little")
            if len(b) < p + 10:
                raise _HeaderError("truncated WebP header")
            return ImageHeader("WebP", w, h, 4, 1)
        if tag == b"VP8L":
            if len(b) < p + 5 or b[p] != 0x2F:
                raise _HeaderError("corrupt lossless WebP header")
            bits = int.from_bytes(b[p + 1 : p + 5], "little")
            return ImageHeader("WebP", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF), 4, 1)
        if tag == b"VP8 ":
            if len(b) < p + 10 or bytes(b[p + 3 : p + 6]) != b"\x9d\x01\x2a":
                raise _HeaderError("corrupt lossy WebP header")
            w, h = struct.unpack("<HH", b[p + 6 : p + 10])
            return ImageHeader("WebP", w & 0x3FFF, h & 0x3FFF, 3, 1)
        raise _HeaderError(f"corrupt WebP (first chunk {tag!r}, not VP8/VP8L/VP8X)")
    raise _HeaderError("truncated WebP (no VP8/VP8L/VP8X chunk)")


_TIFF_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 6: ("b", 1), 8: ("h", 2), 9: ("i", 4), 16: ("Q", 8), 17: ("q", 8)}


def _tiff_header(b: memoryview) -> ImageHeader:
    e = "<" if bytes(b[:2]) == b"II" else ">"
    big = bytes(b[2:4]) in (b"+\0", b"\0+")
    if big:
        bytesize, _, ifd = struct.unpack(e + "HHQ", b[4:16])
        if bytesize != 8:
            raise _HeaderError("corrupt BigTIFF header")
        (count,) = struct.unpack(e + "Q", b[ifd : ifd + 8])
        start, entry, inline = ifd + 8, 20, 8
    else:
        (ifd,) = struct.unpack(e + "I", b[4:8])
        (count,) = struct.unpack(e + "H", b[ifd : ifd + 2])
        start, entry, inline = ifd + 2, 12, 4
    if count == 0 or count > 4096:
        raise _HeaderError("corrupt TIFF (bad directory)")
    tags: dict[int, int] = {}
    for k in range(count):
        o = start + k * entry
        if big:
            tag, typ, n = struct.unpack(e + "HHQ", b[o : o + 12])
            field_at = o + 12
        else:
            tag, typ, n = struct.unpack(e + "HHI", b[o : o + 8])
            field_at = o + 8
        if tag not in (256, 257, 258, 262, 277, 322, 323) or typ not in _TIFF_TYPES or n < 1:
            continue
        fmt, size = _TIFF_TYPES[typ]
        at = field_at
        if size * n > inline:  # the values live elsewhere; the first one is what we need
            (at,) = struct.unpack(e + ("Q" if big else "I"), b[field_at : field_at + inline])
        (tags[tag],) = struct.unpack(e + fmt, b[at : at + size])
    if 256 not in tags or 257 not in tags:
        raise _HeaderError("TIFF without ImageWidth/ImageLength")
    spp = max(1, tags.get(277, 1))
    channels = max(spp, 4) if tags.get(262) == 3 else spp  # palette images decode to colour
    bits = max(1, tags.get(258, 1))
    if 322 in tags or 323 in tags:  # tiled: the decoder allocates one whole tile, which may exceed the image
        tile = tags.get(322, 0) * tags.get(323, 0)
        if tile > max(tags[256] * tags[257], 1 << 18):
            raise _HeaderError(
                f"TIFF tile {tags.get(322)}x{tags.get(323)} is larger than its {tags[256]}x{tags[257]} image"
            )
    return ImageHeader("TIFF", tags[256], tags[257], min(channels, 64), max(1, -(-bits // 8)))


def _bmp_header(b: memoryview) -> ImageHeader:
    (dib,) = struct.unpack("<I", b[14:18])
    if dib == 12:
        w, h, _, bpp = struct.unpack("<HHHH", b[18:26])
    elif dib >= 40:
        w, h, _, bpp = struct.unpack("<iiHH", b[18:30])
    else:
        raise _HeaderError(f"unsupported BMP header size {dib}")
    return ImageHeader("BMP", w, abs(h), 4 if bpp == 32 else 3, 1)
