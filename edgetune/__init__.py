"""edgetune shared core: preprocessing spec, image decoding, bundle format and small shared helpers.

This package is imported by the trainer *and* by the edge (server, client), so it
must stay dependency-light: NumPy and OpenCV only, Python 3.10 compatible, and never
import torch, ray, trainer or tuner.
"""

__version__ = "0.1.0"
