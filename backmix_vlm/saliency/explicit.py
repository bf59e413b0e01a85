"""Explicit-softmax attention forwards: the attention matrix ``A`` of fused-attention blocks.

open_clip (``nn.MultiheadAttention(need_weights=False)``) and timm
(``F.scaled_dot_product_attention``) both run fused attention kernels that never materialise
``A``.  :func:`explicit_attention` temporarily replaces each block's attention ``forward`` with
an explicit-softmax version that uses the module's *own* weights (outputs equal the fused path
to float rounding) and hands ``A`` to a callback, so it can be kept in the autograd graph.
Only the blocks asked for (``explicit_from`` on) are patched; the blocks before keep their fused
attention (flash / memory-efficient kernels, no ``A`` in memory).  Attention logits and the
softmax are computed in fp32 on bf16 / fp16 inputs, as the fused kernels do.  Nothing else
changes: no ``requires_grad`` flips, and the original forwards are restored in ``finally:``.

Supported attention modules: ``nn.MultiheadAttention``, ``timm.layers.Attention``,
``open_clip.transformer.Attention``; more with :func:`register_attention_forward`.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError

RecordFn = Callable[[int, Tensor], Tensor]
ForwardFactory = Callable[[nn.Module, Callable[[Tensor], Tensor]], Callable[..., Any]]


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Bool masks (True = masked, torch MHA convention) → additive -inf masks."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


_LOW = (torch.bfloat16, torch.float16)


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``q k^T * scale`` (N, H, L, S); in fp32 when q / k are bf16 / fp16, like the fused kernels
    (a bf16 logit of 30 is off by up to 0.06, i.e. 6 % after the exponential)."""
    if q.dtype in _LOW or k.dtype in _LOW:
        with torch.autocast(q.device.type, enabled=False):
            return (q.float() * scale) @ k.float().transpose(-2, -1)
    return (q * scale) @ k.transpose(-2, -1)


def _softmax_fp32(scores: Tensor) -> Tensor:
    """Post-softmax attention in fp32 (the relevance reads it); the value product casts it to v's dtype."""
    return scores.softmax(dim=-1, dtype=torch.float32)


def _mha_forward(mod: nn.MultiheadAttention, record: Callable[[Tensor], Tensor]) -> Callable[..., Any]:
    """Explicit ``nn.MultiheadAttention.forward`` (open_clip's ResidualAttentionBlock)."""
    if mod.bias_k is not None or mod.add_zero_attn:
        raise ModelError("nn.MultiheadAttention with add_bias_kv / add_zero_attn is not supported by the "
                         "attention-relevance extractor")

    def forward(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if query.dim() != 3:
            raise ModelError(f"attention relevance needs batched (3-D) inputs, got shape {tuple(query.shape)}")
        heads = mod.num_heads
        if mod._qkv_same_embed_dim:
            w_q, w_k, w_v = mod.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight
        b_q, b_k, b_v = mod.in_proj_bias.chunk(3) if mod.in_proj_bias is not None else (None, None, None)
        # project in the input's own layout (a transposed, non-contiguous input makes CPU bf16
        # projections several times slower), then view per head: (N, H, L, D)
        if query is key and key is value and mod._qkv_same_embed_dim:  # self-attention: one packed matmul
            q, k, v = F.linear(query, mod.in_proj_weight, mod.in_proj_bias).chunk(3, dim=-1)
        else:
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        if not mod.batch_first:  # (L, N, E) -> (N, L, E) views
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        n, tgt, emb = q.shape
        src = k.shape[1]
        head_dim = emb // heads
        q = q.reshape(n, tgt, heads, head_dim).transpose(1, 2)
        k = k.reshape(n, src, heads, head_dim).transpose(1, 2)
        v = v.reshape(n, src, heads, head_dim).transpose(1, 2)
        scores = _scores(q, k, head_dim ** -0.5)  # (N, H, L, S)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=scores.device).triu(1)
        bias = _additive_mask(attn_mask, scores.dtype)
        if bias is not None:
            scores = scores + (bias.view(n, heads, tgt, src) if bias.dim() == 3 else bias)
        pad = _additive_mask(key_padding_mask, scores.dtype)
        if pad is not None:
            scores = scores + pad.view(n, 1, 1, src)
        attn = record(_softmax_fp32(scores))
        out = F.dropout(attn, p=mod.dropout, training=mod.training).to(v.dtype) @ v
        if mod.batch_first:
            out = mod.out_proj(out.transpose(1, 2).reshape(n, tgt, emb))
        else:  # (N, H, L, D) -> (L, N, E), contiguous for the projection
            out = mod.out_proj(out.permute(2, 0, 1, 3).reshape(tgt, n, emb))
        weights = (attn.mean(dim=1) if average_attn_weights else attn) if need_weights else None
        return out, weights

    return forward


def _timm_forward(mod: nn.Module, record: Callable[[Tensor], Tensor]) -> Callable[..., Any]:
    """Explicit ``timm.layers.Attention.forward`` (timm's own non-fused branch, with a record hook)."""

    def forward(x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        heads = mod.num_heads
        head_dim = getattr(mod, "head_dim", None) or mod.qkv.out_features // (3 * heads)
        gate_layer = getattr(mod, "gate", None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
        q, k, v = mod.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = mod.q_norm(q), mod.k_norm(k)
        scores = _scores(q, k, mod.scale)
        if is_causal:  # SDPA semantics: is_causal wins over attn_mask
            attn_mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        if attn_mask is not None:  # SDPA convention: bool True = attend
            attn_mask = _additive_mask(~attn_mask, scores.dtype) if attn_mask.dtype == torch.bool else attn_mask
            scores = scores + attn_mask.to(scores.dtype)
        attn = record(_softmax_fp32(scores))
        out = (mod.attn_drop(attn).to(v.dtype) @ v).transpose(1, 2).reshape(b, n, heads * head_dim)
        out = getattr(mod, "norm", nn.Identity())(out)
        if gate is not None:
            out = out * gate
        return mod.proj_drop(mod.proj(out))

    return forward


def _open_clip_forward(mod: nn.Module, record: Callable[[Tensor], Tensor]) -> Callable[..., Any]:
    """Explicit ``open_clip.transformer.Attention.forward`` (CustomResidualAttentionBlock)."""
    if mod.logit_scale is not None:  # open_clip 3.3's own scaled-cosine branch fails on 4-D q/k
        raise ModelError("open_clip scaled-cosine attention is not supported by the attention-relevance extractor")

    def forward(x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        n, length, channels = x.shape
        heads = mod.num_heads
        q, k, v = F.linear(x, mod.in_proj_weight, mod.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None and attn_mask.dim() == 3:  # open_clip: (L, L) or (N*H, L, L), bool True = masked
            attn_mask = attn_mask.reshape(n, heads, length, length)
        scores = _scores(mod.ln_q(q), mod.ln_k(k), mod.scale)
        bias = _additive_mask(attn_mask, scores.dtype)
        if bias is not None:
            scores = scores + bias
        attn = record(_softmax_fp32(scores))
        out = mod.attn_drop(attn).to(v.dtype) @ v
        if mod.head_scale is not None:
            out = out * mod.head_scale
        out = mod.ln_inner(out.transpose(1, 2).reshape(n, length, channels))
        return mod.out_drop(mod.out_proj(out))

    return forward


def _builtin_forwards() -> list[tuple[type, ForwardFactory]]:
    table: list[tuple[type, ForwardFactory]] = [(nn.MultiheadAttention, _mha_forward)]
    try:
        from timm.layers import Attention as TimmAttention

        table.append((TimmAttention, _timm_forward))
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    try:
        from open_clip.transformer import Attention as OpenClipAttention

        table.append((OpenClipAttention, _open_clip_forward))
    except ImportError:  # pragma: no cover - open_clip is a dependency
        pass
    return table


_EXPLICIT_FORWARDS: list[tuple[type, ForwardFactory]] = _builtin_forwards()


def register_attention_forward(cls: type, factory: ForwardFactory) -> None:
    """Teach the extractor a new attention module type.

    ``factory(module, record)`` returns a drop-in ``forward`` that computes the post-softmax
    attention ``A`` (B, H, T, T) explicitly with the module's weights and uses ``record(A)``
    (which may return a replacement tensor) in place of ``A`` downstream.
    """
    _EXPLICIT_FORWARDS.insert(0, (cls, factory))


def _forward_factory(module: nn.Module) -> ForwardFactory:
    for cls, factory in _EXPLICIT_FORWARDS:
        if isinstance(module, cls):
            return factory
    known = ", ".join(f"{c.__module__}.{c.__qualname__}" for c, _ in _EXPLICIT_FORWARDS)
    raise ModelError(
        f"attention module {type(module).__module__}.{type(module).__qualname__} is not supported by the "
        f"attention-relevance extractor; supported: {known} (add one with register_attention_forward)"
    )


def _attention_of(block: nn.Module) -> nn.Module:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.Module):
        raise ModelError(f"transformer block {type(block).__name__} has no `.attn` attention module")
    return attn


_MISSING = object()


@contextmanager
def _patched_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    saved = module.__dict__.get("forward", _MISSING)  # an earlier instance-level patch, if any
    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if saved is _MISSING:
            del module.forward
        else:
            module.forward = saved  # type: ignore[method-assign]


def _no_grad_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return forward(*args, **kwargs)

    return run


@contextmanager
def explicit_attention(
    blocks: Sequence[nn.Module], record: RecordFn, no_grad_below: int = 0, explicit_from: int = 0
) -> Iterator[None]:
    """Run ``blocks[explicit_from:]`` with explicit-softmax attention; ``record(block_index, A)`` sees their ``A``.

    ``record`` returns the tensor used downstream (``A`` itself, or e.g. a detached leaf copy).
    Blocks before ``explicit_from`` keep their own (fused) attention: nobody reads their ``A``.
    Blocks with index < ``no_grad_below`` run under ``torch.no_grad()`` (a separate saliency
    pass needs no graph there).  Everything is restored on exit, also after an exception.
    """
    with ExitStack() as stack:
        for i, block in enumerate(blocks):
            if i >= explicit_from:
                attn = _attention_of(block)
                factory = _forward_factory(attn)
                stack.enter_context(_patched_forward(attn, factory(attn, lambda a, i=i: record(i, a))))
            if i < no_grad_below:
                stack.enter_context(_patched_forward(block, _no_grad_forward(block.forward)))
        yield


def check_supported(blocks: Sequence[nn.Module]) -> None:
    """ModelError naming the module unless every block has an ``.attn`` :func:`explicit_attention` can patch."""
    for block in blocks:
        attn = _attention_of(block)
        _forward_factory(attn)(attn, lambda a: a)


def attention_types() -> tuple[type, ...]:
    """The attention module classes :func:`explicit_attention` can patch."""
    return tuple(c for c, _ in _EXPLICIT_FORWARDS)
