"""The training engine: the Accelerate loop with BackMix (:mod:`.trainer`), train tasks per model
family (:mod:`.tasks`), the optimizer and LR schedule (:mod:`.optim`) and atomic checkpoints +
exact resume (:mod:`.checkpoint`).  The open-set evaluation a Trainer calls every ``eval.every`` epochs is a callback
(``evaluate(model, epoch) -> {metric: value}``): :class:`backmix_vlm.ood.OpenSetEvaluator`.

Names are imported lazily (``from backmix_vlm.engine import Trainer``) so that importing the
light modules (checkpoint) does not pull in Accelerate.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Trainer": "trainer", "TrainTask": "tasks", "StepPlan": "tasks", "build_accelerator": "trainer", "build_optimizer": "optim",
    "build_scheduler": "optim", "lr_factor": "optim",
    "ClassifierTask": "tasks",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "capture_rng_state": "checkpoint",
    "restore_rng_state": "checkpoint", "model_state_dict": "checkpoint", "load_model_state_dict": "checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
