"""The engine builder (``make engine``, ``python -m edge_server.engine``): a TensorRT engine of a bundle, built on
the device that will run it.

* :mod:`edge_server.engine.build`: precision choice, parse + configure + build, the accuracy check against ONNX
  Runtime, the CLI;
* :mod:`edge_server.engine.cache`: build options, engine naming and sidecars, reuse of an installed or cached engine;
* :mod:`edge_server.engine.calibrator`: INT8 entropy calibration over the bundle's calibration images.

Part of the edge package (no torch, ray or trainer); TensorRT and cuda-python are imported only when a build runs.
"""
