"""Generated gRPC/protobuf code for the ``edgetune.v1`` API (from ``proto/edgetune/v1/*.proto``).

Regenerate with ``make proto``; never edit ``*_pb2*.py`` by hand (``tests/test_proto_fresh.py``
fails when they are stale).
"""
