"""Every EXIF orientation (1-8) turns the pixels the way a viewer shows them (edgetune.imagedecode.apply_orientation:
a table of OpenCV operations, checked here against NumPy's own flips and rotations)."""

from __future__ import annotations

import numpy as np
import pytest

from edgetune.imagedecode import apply_orientation

IMG = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # 2 rows x 3 columns, distinct pixels

EXPECTED = {
    1: IMG,
    2: IMG[:, ::-1],  # mirrored left-right
    3: np.rot90(IMG, 2),
    4: IMG[::-1],  # mirrored top-bottom
    5: IMG.transpose(1, 0, 2),  # transposed
    6: np.rot90(IMG, -1),  # rotated 90° clockwise
    7: np.rot90(IMG.transpose(1, 0, 2), 2),  # transverse
    8: np.rot90(IMG, 1),  # rotated 90° counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(EXPECTED))
def test_each_orientation(orientation):
    assert np.array_equal(apply_orientation(IMG, orientation), EXPECTED[orientation])


def test_an_unknown_orientation_leaves_the_pixels():
    assert apply_orientation(IMG, 0) is IMG and apply_orientation(IMG, 9) is IMG
