"""The frozen backbone an adapter wraps: one typed factory for open_clip CLIPs and timm ViTs.

open_clip style: the backbone is described by data (:class:`BackboneConfig`, the ``backbone``
section of a ``fewshot`` job) and built by one function::

    from backmix_vlm.models.backbone import BackboneConfig, create_backbone

    bb = create_backbone(BackboneConfig(name="ViT-B-16", pretrained="openai"), device="cpu", precision="bf16")
    adapter = create_adapter("coop", bb.base, classes, cfg)        # adapters wrap bb.base
    transform = build_transform(bb.image_size, False, bb.mean, bb.std)

Families are a registry (:data:`BACKBONE_FAMILIES`, name -> builder); each builder returns a
:class:`Backbone` (the base, its tokenizer, input size and normalisation, what identifies its
weights).  :func:`check_backbone` checks name / tag / weights file without loading anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..registry import Registry
from ..validation import check_choice

FROZEN_WEIGHTS = ("compute", "fp32")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's default when a model's pretrained_cfg has none
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneConfig:
    """The frozen backbone: an open_clip CLIP (CoOp, LoCoOp, VPT, LoRA) or a timm ViT (VPT, LoRA)."""

    family: str = "clip"                   # clip | timm
    name: str = "ViT-B-16"                 # open_clip model name (or backmix-tiny-clip) | timm model name
    pretrained: str | None = "openai"      # clip: open_clip tag (null = random init); timm: "timm" (its weights) or null
    checkpoint: str | None = None          # local weights file (clip state dict, or timm-layout safetensors)
    image_size: int | None = None          # timm: input size (default: the model's); clip: fixed by the model
    cache_dir: str | None = None           # open_clip download cache
    options: dict[str, Any] = field(default_factory=dict)  # timm.create_model keywords (e.g. {patch_size: 8, depth: 2})
    frozen_weights: str = "compute"        # compute: frozen weights held in run.precision's dtype (bf16 / fp16) once | fp32: re-cast by autocast every step (official CoOp)

    def validate(self) -> None:
        check_choice(self.family, FAMILIES, "backbone.family")
        check_choice(self.frozen_weights, FROZEN_WEIGHTS, "backbone.frozen_weights")
        if self.family == "clip" and self.options:
            raise ConfigError("backbone.options: only for timm backbones; CLIP architectures are named by backbone.name")


@dataclass
class Backbone:
    """A built frozen backbone and what its inputs must look like.

    ``base`` is what adapters wrap: a :class:`~backmix_vlm.models.clip.ClipBundle` (CLIP) or
    the timm ``VisionTransformer``.  ``identity`` (name + weights) goes into results tables.
    """

    base: Any
    family: str
    name: str
    weights: str | None
    image_size: int
    mean: list[float]
    std: list[float]
    tokenizer: Any = None                  # CLIP's tokenizer; None for vision-only backbones

    @property
    def module(self) -> Any:
        """The frozen ``nn.Module`` itself (the open_clip model inside a bundle, or the ViT)."""
        return self.base.model if self.family == "clip" else self.base

    @property
    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights}


#: family name -> builder(cfg, device, where) -> Backbone (frozen-dtype handling is done by create_backbone)
BACKBONE_FAMILIES: Registry[Callable[..., Backbone]] = Registry("backbone family")


@BACKBONE_FAMILIES.register("clip")
def _clip_backbone(cfg: BackboneConfig, device: Any, where: str) -> Backbone:
    from .clip import load_clip

    if cfg.options:
        raise ConfigError(f"{where}.options: only for timm backbones; CLIP architectures are named by {where}.name")
    bundle = load_clip(cfg.name, cfg.pretrained, cfg.checkpoint, device=device, cache_dir=cfg.cache_dir,
                       config_section=where)
    if cfg.image_size is not None and cfg.image_size != bundle.image_size:
        raise ConfigError(f"{where}.image_size: {cfg.name} takes {bundle.image_size} px inputs; remove the key")
    return Backbone(bundle, "clip", bundle.name, bundle.pretrained, int(bundle.image_size), list(bundle.mean),
                    list(bundle.std), tokenizer=bundle.tokenizer)


@BACKBONE_FAMILIES.register("timm")
def _timm_backbone(cfg: BackboneConfig, device: Any, where: str) -> Backbone:
    from .vit import load_timm_vit

    file = cfg.checkpoint or (cfg.pretrained if cfg.pretrained and os.path.isfile(cfg.pretrained) else None)  # local: no hub
    pretrained: Any = file or (True if cfg.pretrained not in (None, "", "none", "false") else False)
    vit = load_timm_vit(cfg.name, pretrained=pretrained, img_size=cfg.image_size, config_section=where,
                        **cfg.options).to(device).eval()
    vit.requires_grad_(False)  # the adapter freezes it anyway
    dc = vit.pretrained_cfg or {}
    size = cfg.image_size or int(vit.patch_embed.img_size[0])
    return Backbone(vit, "timm", cfg.name, str(pretrained), size, list(dc.get("mean", IMAGENET_MEAN)),
                    list(dc.get("std", IMAGENET_STD)))


FAMILIES = tuple(BACKBONE_FAMILIES.names())


def create_backbone(cfg: BackboneConfig, *, device: Any = "cpu", precision: str = "no", seed: int | None = None,
                    where: str = "backbone") -> Backbone:
    """Build the frozen backbone ``cfg`` describes on ``device``.

    ``seed`` seeds torch first, so random-init backbones (tests, tiny models) are rebuilt
    identically (``eval`` / ``visualize`` rebuild the one a run trained on).  With
    ``frozen_weights: compute`` and a bf16 / fp16 ``precision`` the frozen weights are held in
    that dtype once (:func:`backmix_vlm.models.frozen.hold_frozen_in`), before any adapter is
    built, so every seed's adapter sees the same weights.  ``where`` names the config section
    in error messages.
    """
    import torch

    from .frozen import frozen_compute_dtype, hold_frozen_in

    if seed is not None:
        torch.manual_seed(seed)
    backbone = BACKBONE_FAMILIES.get(cfg.family)(cfg, device, where)
    if cfg.frozen_weights == "compute":
        hold_frozen_in(backbone.module, frozen_compute_dtype(precision, device))
    return backbone


def check_backbone(cfg: BackboneConfig, where: str = "backbone") -> None:
    """Name, tag and weights file of ``cfg``, checked without loading the model."""
    if cfg.family == "clip":
        from .clip import check_clip_source

        check_clip_source(cfg.name, cfg.pretrained, cfg.checkpoint, where)
    else:
        from .vit import check_timm_name

        check_timm_name(cfg.name)
        if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
            raise ConfigError(f"{where}.checkpoint: file not found: {cfg.checkpoint}")
