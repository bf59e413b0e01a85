"""Mixers by name: ``MIXERS`` (backmix, cutout, mixup, cutmix, none) and :func:`build_mixer`.

``MIXER_NAMES`` is the one list of mixer names (``augment.name`` of the train job, the
trainer's ``augment=``); the registry holds exactly these (tests/test_compat.py checks it).
:func:`active_mixer` is the one rule for how ``augment.name`` and ``backmix.enabled`` combine.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import torch

from ..config import MIXER_NAMES, AugmentConfig, BackMixConfig, active_mixer  # noqa: F401 (re-exported)
from ..errors import ConfigError
from ..registry import Registry

MIXERS: Registry[Callable[..., Any]] = Registry("mixer")
# Keys of BackMixConfig that configure the engine or the bank, not a mixer's constructor.
_BACKMIX_FIELDS = {f.name for f in dataclasses.fields(BackMixConfig)}


def build_mixer(name: str, cfg: BackMixConfig | dict[str, Any] | None = None, bank: Any = None,
                num_classes: int | None = None, generator: torch.Generator | None = None) -> Any:
    """Build the mixer ``name`` from a config section or a dict of constructor options.

    * ``BackMixConfig`` fields (cut_area, mask_ratio, same_location, pairing, ...) go to the
      mixers that accept them; the rest of that section (enabled, mode, momentum,
      bank_update_every) configures the engine / bank and is ignored here.
    * Any other dict key must be a constructor option of that mixer (e.g. ``alpha`` for
      mixup / cutmix, ``side`` for cutout), otherwise a ConfigError lists the accepted ones.
    * ``bank``, ``num_classes`` and ``generator`` are passed to mixers that take them;
      ``backmix`` requires a bank.
    """
    factory = MIXERS.get(name)
    accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
    if cfg is None:
        data: dict[str, Any] = {}
    elif isinstance(cfg, BackMixConfig):
        data = dataclasses.asdict(cfg)
    elif isinstance(cfg, dict):
        data = dict(cfg)
    else:
        raise ConfigError(f"mixer '{name}': config must be a BackMixConfig or a mapping, got {type(cfg).__name__}")
    params: dict[str, Any] = {}
    for key, value in data.items():
        if key in accepted:
            params[key] = value
        elif key not in _BACKMIX_FIELDS:
            raise ConfigError(
                f"mixer '{name}': unknown option '{key}'; accepted: {', '.join(accepted) or 'none'}"
            )
    for key, value in (("bank", bank), ("num_classes", num_classes), ("generator", generator)):
        if key in accepted and value is not None:
            params.setdefault(key, value)
    if "bank" in accepted and params.get("bank") is None:
        raise ConfigError(f"mixer '{name}' needs a MaskBank: pass bank=MaskBank(num_samples, cam_size)")
    return factory(**params)
