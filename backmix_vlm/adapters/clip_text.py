"""open_clip's text tower, driven with token *embeddings* instead of token ids.

Prompt learners (CoOp, LoCoOp) replace some token embeddings with learned vectors, so they
cannot call ``model.encode_text(ids)``.  :func:`encode_text_embeddings` runs the rest of
open_clip's text path exactly as ``encode_text`` does (same order of operations, so the
result is bit-identical when the embeddings are the real token embeddings):

    x + positional_embedding → transformer(causal attn_mask) → ln_final
      → pool at the EOT token (open_clip's ``text_global_pool``) → text_projection

Both open_clip layouts are handled: ``CLIP`` keeps the text modules on the model,
``CustomTextCLIP`` keeps them in ``model.text`` (a ``TextTransformer``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelError


@dataclass
class TextTower:
    """The pieces of an open_clip text encoder, wherever the model keeps them."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any            # Parameter (D, E), nn.Linear, or None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None
    context_length: int


def text_tower(model: nn.Module) -> TextTower:
    """The text-tower view of an open_clip ``CLIP`` / ``CustomTextCLIP`` model."""
    from open_clip.transformer import TextTransformer  # lazy: timm-only installs import the adapters too

    if isinstance(getattr(model, "text", None), TextTransformer):
        t = model.text
        if t.cls_emb is not None or t.use_pad_mask:
            raise ModelError(
                f"prompt learning needs a causal CLIP text tower; {type(model).__name__}.text uses a "
                "class-token / padding-mask text encoder (CoCa-style), which is not supported"
            )
        return TextTower(t.token_embedding, t.positional_embedding, t.transformer, t.ln_final,
                         t.text_projection, t.attn_mask, t.pool_type, getattr(t, "eos_id", None),
                         t.context_length)
    if all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        return TextTower(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                         getattr(model, "text_projection", None), getattr(model, "attn_mask", None),
                         getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None),
                         model.context_length)
    raise ModelError(
        f"prompt learning needs an open_clip CLIP model with a transformer text tower; got "
        f"{type(model).__name__} (Hugging Face text towers are not supported)"
    )


def encode_text_embeddings(model: nn.Module, embeddings: torch.Tensor, token_ids: torch.Tensor,
                           truncate: bool | None = None, length: int | None = None) -> torch.Tensor:
    """Text features ``(N, E)`` from token embeddings ``(N, L, D)``; ``token_ids`` locate the EOT token.

    ``truncate``: run only positions up to the last EOT of the batch.  With CLIP's causal mask
    and EOT pooling the dropped (padding) positions cannot reach the pooled token, so the
    features are the same up to float rounding (a CoOp prompt of 16 context tokens + a class
    name is ~20 of 77 positions: ~3.5x less text-tower work).  Default: on when the text tower
    is held in bf16 / fp16 (:mod:`backmix_vlm.models.frozen`), off in fp32 so the result stays
    bit-identical to ``encode_text``.  ``length``: the truncated length if the caller knows it
    (the last EOT position + 1; saves a device-to-host sync per call on a GPU).
    """
    t = text_tower(model)
    cast_dtype = t.transformer.get_cast_dtype()
    pos, attn_mask = t.positional_embedding, t.attn_mask
    if truncate is None:
        truncate = cast_dtype in (torch.bfloat16, torch.float16)
    if truncate and attn_mask is not None and (t.pool_type == "argmax" or (t.pool_type == "eos" and t.eos_id is not None)):
        end = length if length is not None else last_eot(token_ids, t) + 1
        embeddings, token_ids, pos, attn_mask = embeddings[:, :end], token_ids[:, :end], pos[:end], attn_mask[:end, :end]
    x = embeddings.to(cast_dtype) + pos.to(cast_dtype)
    x = t.transformer(x, attn_mask=attn_mask)
    x = t.ln_final(x)
    from open_clip.transformer import text_global_pool

    x = text_global_pool(x, token_ids, t.pool_type, eos_token_id=t.eos_id)
    if t.text_projection is not None:
        x = t.text_projection(x) if isinstance(t.text_projection, nn.Linear) else x @ t.text_projection
    return x


def last_eot(token_ids: torch.Tensor, tower: TextTower) -> int:
    """Position of the last pooled (EOT / EOS) token over a batch of token id rows."""
    if tower.pool_type == "eos" and tower.eos_id is not None:
        return int((token_ids == tower.eos_id).int().argmax(dim=-1).max())
    return int(token_ids.argmax(dim=-1).max())


def unwrap_clip(base: Any, tokenizer: Callable[..., torch.Tensor] | None = None) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """``(model, tokenizer)`` from a :class:`~backmix_vlm.models.clip.ClipBundle` or a bare open_clip model.

    A bare model gets open_clip's CLIP BPE tokenizer at the model's context length.
    """
    model = base
    if not isinstance(base, nn.Module) and hasattr(base, "model"):  # ClipBundle
        model = base.model
        tokenizer = tokenizer or getattr(base, "tokenizer", None)
    if not isinstance(model, nn.Module) or not hasattr(model, "visual") or not hasattr(model, "logit_scale"):
        raise ModelError(f"expected an open_clip CLIP model or a ClipBundle (see load_clip), got {type(base).__name__}")
    if tokenizer is None:
        import open_clip

        tokenizer = open_clip.SimpleTokenizer(context_length=getattr(model, "context_length", 77))
    return model, tokenizer
