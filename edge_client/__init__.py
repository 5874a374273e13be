"""edgetune camera client: streams frames from cameras, URLs, video files or image directories to
an edgetune server over gRPC and logs/shows the classifications (``python -m edge_client``).

Depends only on grpcio, protobuf, NumPy, OpenCV and the ``edgetune`` core package.
"""
