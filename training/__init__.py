"""From logs to a specialist: filter a task's logs, train a LoRA adapter, evaluate, gate, register, deploy.

`run(cfg) -> RunReport` is the Python API; `specialist-router train` the command. Importing this package
does not import torch (the device must be chosen first).
"""
from __future__ import annotations

from training.config import PROFILES, TrainConfig, load


def run(cfg: TrainConfig, **kw):
    """Run one training job end to end; see `training.pipeline.run`."""
    from training.pipeline import run as _run  # lazy: the pipeline loads torch, which must follow apply_device()

    return _run(cfg, **kw)


__all__ = ["PROFILES", "TrainConfig", "load", "run"]
