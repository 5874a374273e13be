"""Real test media for the camera client: a video file and image directories made from
scikit-image's bundled texture photos (brick, grass, gravel; CC0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXTURES = ("brick", "grass", "gravel")


def texture_frames(n: int, size: int = 256) -> list[np.ndarray]:
    """``n`` BGR frames: windows sliding over the three texture photos in turn (n/3 per photo)."""
    import cv2
    from skimage import data

    photos = [getattr(data, name)() for name in TEXTURES]  # 512x512 grey uint8
    per = max(1, -(-n // len(photos)))
    frames = []
    for i in range(n):
        photo = photos[min(i // per, len(photos) - 1)]
        k = i % per
        off = (k * 16) % (photo.shape[0] - size)
        tile = np.ascontiguousarray(photo[off : off + size, off : off + size])
        frames.append(cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR))
    return frames


def write_video(path: Path, n: int = 45, size: int = 256, fps: float = 30.0) -> Path:
    """MJPG AVI with ``n`` frames of ``size`` x ``size`` pixels."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MJPG video {path}")
    for frame in texture_frames(n, size):
        writer.write(frame)
    writer.release()
    return path


def write_image_dir(path: Path, n: int = 6, size: int = 64) -> Path:
    """A directory of ``n`` PNG images (plus one non-image file that must be ignored)."""
    import cv2

    path.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(texture_frames(n, 256)):
        cv2.imwrite(str(path / f"img_{i:03d}.png"), cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA))
    (path / "notes.txt").write_text("not an image\n")
    return path
