"""VPT: visual prompt tuning (Jia et al., ECCV 2022) over open_clip and timm ViTs.

``num_tokens`` learned prompt tokens are inserted after the class token (and after timm's
register tokens) of a frozen ViT; only the prompts and a head train.

* shallow: prompts enter once, before the first block;
* deep: block ``i > 0`` gets its own prompts, which *replace* the previous block's prompt
  outputs (VPT's ``forward_deep_prompt``); ``deep_prompt_embeddings`` holds blocks 1..L-1.

Prompts are inserted into the blocks' input space, i.e. after the backbone's pre-norm
(open_clip ``ln_pre`` / timm ``norm_pre``), the same space deep prompts replace.  After the
last block the prompt outputs are dropped and the backbone's own pooling / final norm /
projection run on ``[prefix tokens, patches]``, so ``num_tokens=0`` reproduces the backbone
exactly and ``avg`` pooling never averages prompts.  Every block is called as the real module,
so forward hooks on blocks / attention modules (saliency) see the prompted sequence; use
:attr:`VPT.num_prefix_tokens` to slice the patch tokens out of it.

Defaults follow VPT's code (KMnP/vpt, src/configs/config.py): ``NUM_TOKENS=5``, shallow,
``DROPOUT=0.0``, and the "random" init, uniform in ``±sqrt(6 / (3 * patch * patch + dim))``
(xavier-uniform style).  The paper tunes the length over {1, 5, 10, 50, 100, 200} per task.

Heads: ``linear`` trains ``nn.Linear(feature_dim, K)`` on the pooled feature (CLIP: the
projected image embedding); ``zeroshot_text`` (CLIP only) uses frozen CLIP text features of
the class names, logits = ``logit_scale * cos``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..models.frozen import fp32_head
from ..models.output import ModelOutput
from ..validation import check_choice
from .base import ADAPTERS, Adapter, resolve_config
from .vision import ClipVision, vision_view

HEADS = ("linear", "zeroshot_text")
INITS = ("uniform", "zeros")


@dataclass
class VPTConfig:
    num_tokens: int = 5                # prompt tokens per layer (VPT code default)
    deep: bool = False                 # VPT-deep: new prompts at every block
    dropout: float = 0.0               # dropout on the prompt tokens
    init: str = "uniform"              # uniform (VPT "random") | zeros
    head: str = "linear"               # linear | zeroshot_text (CLIP only)
    templates: str = "simple"          # zeroshot_text: template set name or "...{}..." string

    def validate(self) -> None:
        if self.num_tokens < 0:
            raise ConfigError(f"adapter.num_tokens: {self.num_tokens} is not accepted; must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout: {self.dropout} is not accepted; must be in [0, 1)")
        check_choice(self.init, INITS, "adapter.init")
        check_choice(self.head, HEADS, "adapter.head")


# ----------------------------------------------------------------------------- adapter
class VPT(Adapter):
    """Visual prompts + head over a frozen ViT (only prompts and the linear head train)."""

    config_class = VPTConfig
    maps_from_backward = True  # the prompts' gradients run through the image tower

    def __init__(self, base: Any, classnames: Sequence[str], cfg: VPTConfig | None = None, *,
                 tokenizer: Callable[..., torch.Tensor] | None = None) -> None:
        model = base
        if not isinstance(base, nn.Module) and hasattr(base, "model"):  # ClipBundle
            model, tokenizer = base.model, tokenizer or getattr(base, "tokenizer", None)
        cfg = resolve_config(VPTConfig, cfg)
        view = vision_view(model, "VPT")
        super().__init__(model)
        self.cfg = cfg
        self.view = view
        if not classnames:
            raise DataError("VPT needs at least one class name, got none")
        self.classnames = [str(c).replace("_", " ") for c in classnames]
        n, width = cfg.num_tokens, view.width
        device = next(model.parameters()).device

        # prompts: VPT's xavier-uniform-style init over the patch-embedding fan-in
        val = math.sqrt(6.0 / float(3 * view.patch_size[0] * view.patch_size[1] + width))
        self.prompt_embeddings = nn.Parameter(self._init(torch.zeros(1, n, width, device=device), val))
        depth = len(view.blocks)
        self.deep_prompt_embeddings = (
            nn.Parameter(self._init(torch.zeros(depth - 1, n, width, device=device), val))
            if cfg.deep and depth > 1 else None
        )
        self.prompt_dropout = nn.Dropout(cfg.dropout)

        if cfg.head == "linear":
            self.head = nn.Linear(view.feature_dim, len(self.classnames)).to(device)
            self.register_buffer("text_features", None, persistent=False)
        else:
            if not isinstance(view, ClipVision):
                raise ConfigError("adapter.head: 'zeroshot_text' needs a CLIP base (a text tower); "
                                  "use head: linear for timm ViTs")
            self.head = None
            self.register_buffer("text_features", self._text_features(model, tokenizer), persistent=False)

    def _init(self, t: torch.Tensor, val: float) -> torch.Tensor:
        return nn.init.uniform_(t, -val, val) if self.cfg.init == "uniform" else t

    @torch.no_grad()
    def _text_features(self, model: nn.Module, tokenizer: Callable[..., torch.Tensor] | None) -> torch.Tensor:
        import open_clip

        from ..models.clip import resolve_templates

        if tokenizer is None:
            tokenizer = open_clip.SimpleTokenizer(context_length=getattr(model, "context_length", 77))
        weights = open_clip.build_zero_shot_classifier(
            model, tokenizer, self.classnames, list(resolve_templates(self.cfg.templates)),
            num_classes_per_batch=10, device=next(model.parameters()).device, use_tqdm=False)
        return weights.T.contiguous()  # (K, E), unit norm

    # ------------------------------------------------------------------ saliency hooks
    @property
    def blocks(self) -> nn.Module:
        """The backbone's real transformer blocks (hook these / their attention modules)."""
        return self.view.blocks

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in every block's sequence: class (+ registers) + prompts."""
        return self.view.num_prefix_tokens + self.cfg.num_tokens

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(h, w)`` for ``images``; patch tokens are ``x[:, num_prefix_tokens:]``."""
        return self.view.grid_size(images)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.base.logit_scale.exp()

    # ------------------------------------------------------------------ forward
    def _prompts(self, p: torch.Tensor, batch: int) -> torch.Tensor:
        return self.prompt_dropout(p.unsqueeze(0).expand(batch, -1, -1))

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Token sequence after the last block, prompts included: ``(B, prefix + prompts + P, W)``."""
        view, n = self.view, self.cfg.num_tokens
        x = view.embed(images)
        b, k = x.shape[0], view.num_prefix_tokens
        dtype = x.dtype
        x = torch.cat([x[:, :k], self._prompts(self.prompt_embeddings[0], b).to(dtype), x[:, k:]], dim=1)
        for i, block in enumerate(view.blocks):
            if i > 0 and self.deep_prompt_embeddings is not None:
                deep = self._prompts(self.deep_prompt_embeddings[i - 1], b).to(x.dtype)
                x = torch.cat([x[:, :k], deep, x[:, k + n:]], dim=1)
            x = view.run_block(block, x)
        return x

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled feature ``(B, feature_dim)`` (CLIP: projected image embedding)."""
        x = self.forward_tokens(images)
        k, n = self.view.num_prefix_tokens, self.cfg.num_tokens
        return self.view.pool(torch.cat([x[:, :k], x[:, k + n:]], dim=1))

    def forward(self, images: torch.Tensor) -> ModelOutput:
        feats = self.forward_features(images)
        if self.head is not None:
            return ModelOutput(logits=self.head(feats), features=feats)
        with fp32_head(feats):  # cosines and the logit scale in fp32, also under autocast
            cosine = F.normalize(feats.float(), dim=-1) @ self.text_features.float().T
            return ModelOutput(logits=self.logit_scale.float() * cosine, features=feats, cosine=cosine)


ADAPTERS.add("vpt", VPT)
