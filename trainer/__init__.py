"""edgetune trainer: transfer-learning training core (PyTorch, Ray Train).

Public entry points (import the submodules; this package stays light to import):

- ``trainer.config.TrainConfig``           typed, validated run configuration
- ``trainer.backbones.list_backbones``     the backbone registry
- ``trainer.model.create_model``           backbone + head, freezing
- ``trainer.data.build_data``              scan, split, expand, slice, augment
- ``trainer.loop.train_loop``              the one training loop (in-process or Ray Train worker)
- ``trainer.run.run_training``             one run end to end (train, test evaluation, reports)
- ``trainer.export.export_bundle``         checkpoint -> ONNX bundle
"""
