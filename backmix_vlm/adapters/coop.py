"""CoOp: context optimisation for CLIP (Zhou et al., IJCV 2022).

The class prompt ``"X X ... X {class}."`` is tokenised once; the embeddings of the ``X``
placeholders are replaced by learned context vectors and the sequence runs through CLIP's
frozen text tower (see :mod:`.clip_text`).  Logits are ``logit_scale.exp() * cos(image, text)``.
This follows CoOp's ``PromptLearner`` / ``TextEncoder`` (KaiyangZhou/CoOp, trainers/coop.py):

* ``ctx_init="a photo of a"``: the context starts as that phrase's token embeddings and
  ``n_ctx`` becomes its token count, so before training the text features are exactly CLIP's
  ``encode_text(tokenize("a photo of a {class}."))``.
* otherwise the context is drawn from N(0, ``init_std``²), CoOp's default 0.02;
* ``class_specific`` (CoOp's CSC) learns one context per class; with ``ctx_init`` every class
  starts from the phrase (CoOp silently ignores CSC when ``ctx_init`` is set);
* ``class_token_position``: ``end`` ``[SOS] ctx CLASS . [EOS]``, ``middle``
  ``[SOS] ctx[:n/2] CLASS ctx[n/2:] . [EOS]``, ``front`` ``[SOS] CLASS ctx . [EOS]``.
  The three layouts are permutations of the same tokens, so the EOT position never moves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError, ModelError
from ..models.frozen import class_token_only, fp32_head
from ..models.output import ModelOutput
from ..validation import check_choice
from .base import ADAPTERS, Adapter, resolve_config
from .clip_text import encode_text_embeddings, last_eot, text_tower, unwrap_clip

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


@dataclass
class CoOpConfig:
    n_ctx: int = 16                    # learned context tokens (ignored when ctx_init is set)
    ctx_init: str | None = None        # e.g. "a photo of a": initialise from this phrase
    class_token_position: str = "end"  # end | middle | front
    class_specific: bool = False       # CSC: one context per class
    init_std: float = 0.02             # std of the random context init
    local_features: bool = False       # also return per-patch cosines (GL-MCM); costs a little extra

    def validate(self) -> None:
        check_choice(self.class_token_position, CLASS_TOKEN_POSITIONS, "adapter.class_token_position")
        if self.ctx_init is None and self.n_ctx < 1:
            raise ConfigError(f"adapter.n_ctx: {self.n_ctx} is not accepted; need at least 1 context token")
        if self.ctx_init is not None and not self.ctx_init.replace("_", " ").strip():
            raise ConfigError("adapter.ctx_init: an empty phrase is not accepted; use null for random init")
        if self.init_std <= 0:
            raise ConfigError(f"adapter.init_std: {self.init_std} is not accepted; must be > 0")


def coop_default_schedule(shots: int | None) -> dict[str, Any]:
    """CoOp's ViT-B/16 training recipe as :class:`~backmix_vlm.config.OptimConfig` fields.

    SGD (momentum 0.9, weight decay 5e-4, no Nesterov — Dassl defaults), lr 0.002, batch 32,
    cosine schedule after 1 warm-up epoch at a constant 1e-5.  Epochs follow CoOp's configs:
    1 shot → 50 (``vit_b16_ep50``), 2/4 shots → 100, 8/16 shots → 200.  CoOp defines nothing
    beyond 16 shots; for more shots or full data (``shots=None``/0) we use 50 epochs, the
    schedule LoCoOp trains with, since 200 epochs of a full dataset is far beyond CoOp's budget.
    """
    if shots is not None and shots < 0:
        raise ConfigError(f"shots: {shots} is not accepted; use a positive number or null for full data")
    if not shots or shots == 1 or shots > 16:
        epochs = 50
    else:
        epochs = 100 if shots <= 4 else 200
    return dict(name="sgd", lr=0.002, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="cosine",
                warmup_epochs=1, warmup_lr=1e-5, epochs=epochs, batch_size=32)


def _class_layout(n_ctx: int, name_lens: Sequence[int], length: int, position: str) -> torch.Tensor | None:
    """Per-class gather index ``(K, L)`` turning the ``end`` layout into ``position``'s (None for end)."""
    if position == "end":
        return None
    rows = []
    ctx = list(range(1, 1 + n_ctx))
    for n in name_lens:
        name = list(range(1 + n_ctx, 1 + n_ctx + n))
        rest = list(range(1 + n_ctx + n, length))
        if position == "front":
            order = [0, *name, *ctx, *rest]
        else:  # middle
            half = n_ctx // 2
            order = [0, *ctx[:half], *name, *ctx[half:], *rest]
        rows.append(order)
    return torch.tensor(rows, dtype=torch.long)


class CoOp(Adapter):
    """Learned text context over a frozen open_clip CLIP (only ``ctx`` trains)."""

    config_class = CoOpConfig
    encodes_text = True  # the map path: frozen image tower, maps from a tail pass (engine.adapter_task)

    def __init__(self, base: Any, classnames: Sequence[str], cfg: CoOpConfig | None = None, *,
                 tokenizer: Callable[..., torch.Tensor] | None = None) -> None:
        model, tokenizer = unwrap_clip(base, tokenizer)
        super().__init__(model)
        self.cfg = cfg = resolve_config(self.config_class, cfg)
        if not classnames:
            raise DataError(f"{type(self).__name__} needs at least one class name, got none")
        encode = getattr(tokenizer, "encode", None)
        if encode is None:
            raise ModelError(f"{type(self).__name__} needs open_clip's CLIP BPE tokenizer (with .encode); "
                             f"got {type(tokenizer).__name__}")
        self.classnames = [str(c).replace("_", " ") for c in classnames]
        tower = text_tower(model)
        embed = tower.token_embedding

        # context vectors and the text the placeholders stand for
        if cfg.ctx_init is not None:
            phrase = cfg.ctx_init.replace("_", " ").strip()
            phrase_ids = encode(phrase)
            with torch.no_grad():  # trainable context: fp32 even over a base held in bf16 / fp16
                ctx = embed(torch.tensor(phrase_ids, device=embed.weight.device)).detach().float()
            if cfg.class_specific:
                ctx = ctx.unsqueeze(0).repeat(len(self.classnames), 1, 1)
        else:
            phrase = " ".join(["X"] * cfg.n_ctx)
            phrase_ids = encode(phrase)
            shape = (len(self.classnames), cfg.n_ctx) if cfg.class_specific else (cfg.n_ctx,)
            ctx = torch.empty(*shape, embed.embedding_dim, dtype=torch.float32, device=embed.weight.device)
            nn.init.normal_(ctx, std=cfg.init_std)
        self.n_ctx = n_ctx = len(phrase_ids)
        self.ctx = nn.Parameter(ctx)

        # tokenised prompts: [SOS] ctx name . [EOS] pad...
        name_lens = [len(encode(n)) for n in self.classnames]
        too_long = [n for n in self.classnames if 2 + n_ctx + len(encode(n + ".")) > tower.context_length]
        if too_long:
            raise ConfigError(f"adapter.n_ctx={n_ctx}: the prompt for class {too_long[0]!r} exceeds the text "
                              f"context length ({tower.context_length} tokens); use fewer context tokens")
        ids = tokenizer([f"{phrase} {name}." for name in self.classnames]).to(embed.weight.device)
        if ids.shape[1] != tower.context_length or not bool((ids[:, 1:1 + n_ctx] == torch.tensor(phrase_ids, device=ids.device)).all()):
            raise ModelError("the tokenizer does not match the model's text tower (context length or "
                             "token layout); pass the model's own tokenizer")
        with torch.no_grad():
            embedding = embed(ids)
        self.register_buffer("token_ids", ids, persistent=False)
        self.text_length = last_eot(ids, tower) + 1  # positions a held text tower runs (clip_text)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)            # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:].clone(), persistent=False)    # CLASS . EOS pad
        self.name_lens = name_lens
        self.register_buffer("layout_index", _class_layout(n_ctx, name_lens, ids.shape[1], cfg.class_token_position),
                             persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.base.logit_scale.exp()

    # ------------------------------------------------------------------ text side
    def prompt_embeddings(self) -> torch.Tensor:
        """``(K, L, D)`` token embeddings of every class prompt, context in place."""
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.num_classes, -1, -1)
        x = torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)
        if self.layout_index is not None:
            x = x.gather(1, self.layout_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return x

    def encode_text(self) -> torch.Tensor:
        """``(K, E)`` class text features (unnormalised), differentiable w.r.t. ``ctx``."""
        return encode_text_embeddings(self.base, self.prompt_embeddings(), self.token_ids, length=self.text_length)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, local: bool | None = None) -> ModelOutput:
        """Global logits/cosines; with ``local`` (default: ``cfg.local_features``) also per-patch ones."""
        use_local = self.cfg.local_features if local is None else local
        text = self._emit_text_features(self.encode_text())
        if use_local:
            from ..models.clip import encode_image_global_local

            image, local_feats = encode_image_global_local(self.base, images)
        else:
            with class_token_only(self.base):  # held towers: last block for the class token only
                image, local_feats = self.base.encode_image(images), None
        with fp32_head(image):  # cosines and the logit scale in fp32, also under autocast
            text = F.normalize(text.float(), dim=-1)
            scale = self.logit_scale.float()
            cosine = F.normalize(image.float(), dim=-1) @ text.T
            out = ModelOutput(logits=scale * cosine, features=image, cosine=cosine)
            if local_feats is not None:
                out.local_cosine = F.normalize(local_feats.float(), dim=-1) @ text.T
                out.local_logits = scale * out.local_cosine
        return out


ADAPTERS.add("coop", CoOp)
