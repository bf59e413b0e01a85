"""The optimizer and its per-step LR schedule, built from ``OptimConfig``.

* **LR schedule per step.**  ``cosine`` anneals from ``lr`` to 0 over every step after the
  warm-up; ``step`` multiplies by 0.1 at 50% and 75% of training; ``triangle`` is airbench's
  piecewise-linear one; ``constant`` keeps ``lr``.  Warm-up epochs run at the constant
  ``warmup_lr`` (CoOp's ConstantWarmupScheduler).
* **Parameter groups.**  ``optim.norm_lr_scale`` gives normalisation parameters their own LR
  (airbench); ``optim.freeze_after`` puts parameters in groups the schedule stops after N epochs.
  Both live in the optimizer / scheduler state, so a resume continues them exactly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..config import OPTIMIZERS, SCHEDULES, OptimConfig
from ..errors import ConfigError
from ..validation import check_choice

#: airbench's piecewise-linear schedule: factor 0.2 at step 0, 1.0 at 23 % of training, 0.07 at the end
TRIANGLE = (0.2, 0.23, 0.07)


def norm_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter of a normalisation layer (BatchNorm / GroupNorm / LayerNorm)."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}


def build_optimizer(params: Sequence[nn.Parameter], cfg: OptimConfig,
                    norm_ids: set[int] | None = None,
                    train_epochs: dict[int, int] | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum, the paper's recipe) or AdamW over ``params``.

    ``cfg.norm_lr_scale != 1``: the parameters in ``norm_ids`` get ``lr * scale`` and a weight
    decay divided by the scale, so their decay per step is unchanged (airbench's 64x BN biases).
    ``train_epochs`` (parameter ``id`` -> epochs, from ``optim.freeze_after``) puts those parameters
    in groups of their own whose ``train_epochs`` key makes :func:`build_scheduler` stop them.
    """
    check_choice(cfg.name, OPTIMIZERS, "optim.name")
    params = list(params)
    if not params:
        raise ConfigError("optim: the model has no trainable parameters (requires_grad is False everywhere)")
    if cfg.lr <= 0:
        raise ConfigError(f"optim.lr: {cfg.lr!r} is not accepted; expected a positive number")
    if cfg.norm_lr_scale <= 0:
        raise ConfigError(f"optim.norm_lr_scale: {cfg.norm_lr_scale!r} is not accepted; expected a positive number")
    scale = cfg.norm_lr_scale
    norm_ids = norm_ids if scale != 1.0 and norm_ids else set()
    train_epochs = train_epochs or {}
    keyed: dict[tuple[bool, int | None], list[nn.Parameter]] = {}
    for p in params:  # groups in first-seen order: (normalisation layer?, epochs it trains)
        keyed.setdefault((id(p) in norm_ids, train_epochs.get(id(p))), []).append(p)
    groups: list[dict[str, Any]] = []
    for (is_norm, epochs), members in keyed.items():
        group: dict[str, Any] = {"params": members}
        if is_norm:
            group.update(lr=cfg.lr * scale, weight_decay=cfg.weight_decay / scale)
        if epochs is not None:
            group["train_epochs"] = epochs
        groups.append(group)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, steps_per_epoch: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based), per-step schedule."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.warmup_lr / cfg.lr
    total = max(1, cfg.epochs * steps_per_epoch - warmup)
    t = min(step - warmup, total) / total
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return 0.1 ** sum(t >= m for m in (0.5, 0.75))
    if cfg.schedule == "triangle":
        start, peak, end = TRIANGLE
        return start + (1 - start) * t / peak if t < peak else 1 + (end - 1) * (t - peak) / (1 - peak)
    return 1.0


def frozen_after(model: nn.Module, patterns: dict[str, int | None]) -> dict[int, int]:
    """``optim.freeze_after`` resolved: trainable parameter ``id`` -> epochs it trains.

    A pattern is an ``fnmatch`` glob over ``model.named_parameters()`` names (e.g. ``"*whiten.bias"``);
    one that matches no trainable parameter is an error naming the key.  ``None`` (YAML ``null``)
    switches a pattern off, so a config can undo the freeze its ``_base_`` sets.
    """
    import fnmatch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out: dict[int, int] = {}
    for pattern, epochs in patterns.items():
        if epochs is None:
            continue
        hits = [p for n, p in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(n for n, _ in named[:6])
            raise ConfigError(f"optim.freeze_after: {pattern!r} matches no trainable parameter; names look like: "
                              f"{sample}{', ...' if len(named) > 6 else ''}")
        out.update({id(p): int(epochs) for p in hits})
    return out


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    check_choice(cfg.schedule, SCHEDULES, "optim.schedule")
    if cfg.epochs < 1 or not 0 <= cfg.warmup_epochs < max(cfg.epochs, 1) + (cfg.warmup_epochs == 0):
        raise ConfigError(f"optim: epochs={cfg.epochs}, warmup_epochs={cfg.warmup_epochs}; "
                          "expected epochs >= 1 and 0 <= warmup_epochs < epochs")

    def factor(stop: float) -> Callable[[int], float]:  # a group frozen after ``stop`` steps gets LR 0
        return lambda s: lr_factor(s, steps_per_epoch=steps_per_epoch, cfg=cfg) if s < stop else 0.0

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [factor(g.get("train_epochs", math.inf) * steps_per_epoch) for g in optimizer.param_groups])
