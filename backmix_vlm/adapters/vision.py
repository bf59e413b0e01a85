"""One view of a ViT image tower, shared by VPT, LoRA and the BackMix map path.

A view names the pieces of an open_clip ``VisionTransformer`` or a timm ``VisionTransformer``
that adapters and the attention-relevance maps need, in one layout:

    embed(images) -> (B, prefix + P, W)   # the first block's input, batch-first
    run_block(block, x) / run_blocks(blocks, x)   # batch-first in and out, whatever the tower's layout
    pool(x) -> (B, feature_dim)           # final norm + pooling (+ CLIP's projection)

``blocks`` are the tower's real transformer blocks (hook them / their attention modules),
``num_prefix_tokens`` the tokens before the patches (class + timm registers).  The private
library methods this needs are reached through :mod:`backmix_vlm.compat`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..compat import clip_embed, clip_pool, timm_pos_embed
from ..errors import ModelError


class ClipVision:
    """open_clip ``VisionTransformer``: conv1 → [CLS] + pos → ln_pre → resblocks → ln_post/pool → proj."""

    def __init__(self, visual: nn.Module) -> None:
        if getattr(visual, "attn_pool", None) is not None:
            raise ModelError("open_clip image towers with attentional pooling are not supported "
                             "(VPT, LoRA's image view, BackMix attention maps)")
        self.visual = visual
        self.num_prefix_tokens = 1
        self.width = visual.conv1.out_channels
        ps = visual.patch_size
        self.patch_size = (ps, ps) if isinstance(ps, int) else tuple(ps)
        self.feature_dim = visual.proj.shape[1] if visual.proj is not None else self.width

    @property
    def blocks(self) -> nn.Module:
        return self.visual.transformer.resblocks

    @property
    def batch_first(self) -> bool:
        """Whether the blocks take ``(N, L, D)`` (else open_clip's ``(L, N, D)``)."""
        return bool(self.visual.transformer.batch_first)

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size[0], images.shape[-1] // self.patch_size[1]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return clip_embed(self.visual, images)  # (B, 1 + P, W), after ln_pre

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.batch_first:
            return block(x)
        # contiguous: a strided (L, N, D) view makes CPU bf16 projections several times slower
        return block(x.transpose(0, 1).contiguous()).transpose(0, 1)

    def run_blocks(self, blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """``blocks`` in order on batch-first ``x`` (one layout change for all, like open_clip's Transformer)."""
        if not self.batch_first:
            x = x.transpose(0, 1)  # NLD -> LND
        for block in blocks:
            x = block(x)
        return x if self.batch_first else x.transpose(0, 1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = clip_pool(self.visual, x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def to_batch_first(self, x: torch.Tensor) -> torch.Tensor:
        """A block's input as the tower holds it → ``(N, L, D)``."""
        return x if self.batch_first else x.transpose(0, 1)


class TimmViT:
    """timm ``VisionTransformer``: patch_embed → _pos_embed (cls/reg + pos) → norm_pre → blocks → norm → head."""

    batch_first = True

    def __init__(self, vit: nn.Module) -> None:
        self.vit = vit
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.width = vit.embed_dim
        self.patch_size = tuple(vit.patch_embed.patch_size)
        self.feature_dim = getattr(vit, "head_hidden_size", vit.num_features)

    @property
    def blocks(self) -> nn.Module:
        return self.vit.blocks

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size[0], images.shape[-1] // self.patch_size[1]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit.patch_embed(images)
        x = timm_pos_embed(self.vit, x)
        x = self.vit.patch_drop(x)
        return self.vit.norm_pre(x)

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block(x)

    def run_blocks(self, blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.norm(x), pre_logits=True)

    def to_batch_first(self, x: torch.Tensor) -> torch.Tensor:
        return x


VisionView = ClipVision | TimmViT


def vision_view(model: nn.Module, who: str = "this adapter") -> ClipVision | TimmViT:
    """The view of ``model``'s image tower: an open_clip CLIP (or its ``visual``) or a timm ViT
    (``who`` names the caller in the error for anything else)."""
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    try:
        from open_clip.transformer import VisionTransformer as ClipVisionTransformer
    except ImportError:  # timm-only install
        ClipVisionTransformer = ()  # type: ignore[assignment,misc]

    visual = getattr(model, "visual", model)
    if ClipVisionTransformer and isinstance(visual, ClipVisionTransformer):
        return ClipVision(visual)
    if isinstance(model, TimmVisionTransformer):
        return TimmViT(model)
    raise ModelError(f"{who} needs an open_clip ViT image tower or a timm VisionTransformer; got {type(model).__name__}")
