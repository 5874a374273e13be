"""edgetune edge server: gRPC inference service for Jetsons and CPUs.

No torch, ray, trainer or tuner imports anywhere in this package (checked by
``tests/test_import_boundary.py``); Python 3.10 compatible (JetPack 6).

Entry points: :func:`edge_server.server.make_server` (tests, embedding) and
``python -m edge_server`` (``make serve``).
"""

from __future__ import annotations
