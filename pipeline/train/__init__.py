"""Distributed training on Ray Train, tracked in MLflow.

- ``config``: the YAML schema, dotted-key overrides (``apply_overrides``), resolution against the shards;
- ``launcher``: the driver: checks, new-or-resume, the MLflow run, local Ray or a cluster, ``TorchTrainer``;
- ``loop``: ``train_loop_per_worker``, what every DDP rank runs;
- ``checkpoint``: checkpoints that load without Ray (``load_checkpoint``, ``load_model``);
- ``build``: the model from a config, and the hooks of the methods that train differently.

Submodules are imported on use: ``import pipeline.train`` stays light.
"""
