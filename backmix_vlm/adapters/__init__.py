"""Adapters over frozen CLIP / ViT backbones: CoOp, LoCoOp, VPT (peft style), LoRA (through peft).

``create_adapter(method, base, classnames, cfg)`` builds one by registered name; every
adapter returns a :class:`~backmix_vlm.models.output.ModelOutput` and trains only its own
parameters (``trainable_parameters()``).
"""
from .base import ADAPTERS, Adapter, create_adapter, freeze
from .coop import CoOp, CoOpConfig, coop_default_schedule
from .locoop import LoCoOp, LoCoOpConfig, locoop_regularizer, resolve_top_k
from .lora import LoRA, LoRAConfig, lora_default_schedule
from .vpt import VPT, VPTConfig

__all__ = [
    "ADAPTERS", "Adapter", "create_adapter", "freeze",
    "CoOp", "CoOpConfig", "coop_default_schedule",
    "LoCoOp", "LoCoOpConfig", "locoop_regularizer", "resolve_top_k",
    "VPT", "VPTConfig",
    "LoRA", "LoRAConfig", "lora_default_schedule",
]
