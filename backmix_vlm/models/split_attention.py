"""Attention surgery for LoRA: separate q / k / v Linears over the packed projections of a frozen ViT.

peft adapts ``nn.Linear`` layers, but open_clip's ``nn.MultiheadAttention`` packs q / k / v into
one ``in_proj_weight`` and timm's ``Attention`` into one fused ``qkv`` Linear.
:class:`SplitAttention` and :class:`SplitQKV` replace them with one Linear per projection whose
weights are *views* of the original tensors (no copy) and whose output equals the original
module's; the packed *effective* weights (LoRA included, :func:`effective_linear`) read back
through the original attribute names, and ``to_multihead_attention`` / ``to_linear`` give the
merged plain modules back.  docs/methods.md ("LoRA") has the reasons.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError


def is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer (peft's internals used here and in ``effective_linear``: the base layer,
    the delta weight, the merged state; tested with the peft range of pyproject.toml)."""
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def effective_linear(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(W + ΔW, b)`` of a Linear or a peft LoRA Linear (differentiable in the LoRA matrices)."""
    if is_lora_layer(layer):
        base = layer.get_base_layer()
        weight = base.weight
        if not layer.merged:
            for name in layer.active_adapters:
                if name in layer.lora_A:
                    weight = weight + layer.get_delta_weight(name).to(weight.dtype)
        return weight, base.bias
    return layer.weight, layer.bias


def _view_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are views of existing frozen tensors (no copy)."""
    lin = nn.Linear(1, 1, bias=False, device="meta")
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    lin.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
    return lin


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:  # nn.MultiheadAttention convention: True = not allowed
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (self- or cross-attention, equal embed dims) with separate
    ``q_proj`` / ``k_proj`` / ``v_proj`` Linears, so peft can adapt each one.

    Same call signature and output as the module it replaces (``(out, weights)``); the weights are
    views of the original ``in_proj_weight`` / ``in_proj_bias`` and the original ``out_proj``.
    ``in_proj_weight`` / ``in_proj_bias`` read back the packed *effective* weights (LoRA included),
    so code written for ``nn.MultiheadAttention`` (LoCoOp's value path) keeps working.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ModelError("LoRA q/k/v targets need nn.MultiheadAttention with equal q/k/v dims and no "
                             "add_bias_kv / add_zero_attn")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        ws = mha.in_proj_weight.chunk(3)
        bs = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        self.q_proj, self.k_proj, self.v_proj = (_view_linear(w, b) for w, b in zip(ws, bs))
        self.out_proj = mha.out_proj

    @property
    def in_proj_weight(self) -> Tensor:
        return torch.cat([effective_linear(p)[0] for p in (self.q_proj, self.k_proj, self.v_proj)])

    @property
    def in_proj_bias(self) -> Tensor | None:
        biases = [effective_linear(p)[1] for p in (self.q_proj, self.k_proj, self.v_proj)]
        return None if biases[0] is None else torch.cat(biases)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, record: Callable[[Tensor], Tensor] | None = None
                ) -> tuple[Tensor, Tensor | None]:
        if query.dim() != 3:
            raise ModelError(f"SplitAttention needs batched (3-D) inputs, got shape {tuple(query.shape)}")
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        heads, hd = self.num_heads, self.head_dim
        if self.batch_first:  # (N, L, E) -> (N, H, L, hd), views: no copies
            (n, tgt, _), src = q.shape, k.shape[1]
            q, k, v = (t.view(t.shape[0], t.shape[1], heads, hd).transpose(1, 2) for t in (q, k, v))
        else:  # (L, N, E) -> (N, H, L, hd)
            (tgt, n, _), src = q.shape, k.shape[0]
            q, k, v = (t.view(t.shape[0], t.shape[1], heads, hd).permute(1, 2, 0, 3) for t in (q, k, v))
        bias = _additive(attn_mask, q.dtype)
        if bias is not None and bias.dim() == 3:  # (N * H, L, S)
            bias = bias.view(n, heads, tgt, src)
        pad = _additive(key_padding_mask, q.dtype)
        if pad is not None:
            pad = pad.view(n, 1, 1, src)
            bias = pad if bias is None else bias + pad
        if is_causal and bias is None:
            bias = _additive(torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1), q.dtype)
        p_drop = self.dropout if self.training else 0.0
        weights = None
        if record is None and not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop)
        else:  # explicit softmax: attention relevance records A, need_weights returns it
            scores = (q * hd ** -0.5) @ k.transpose(-2, -1)
            if bias is not None:
                scores = scores + bias
            attn = scores.softmax(dim=-1)
            if record is not None:
                attn = record(attn)
            out = F.dropout(attn, p=p_drop, training=self.training) @ v
            if need_weights:
                weights = attn.mean(dim=1) if average_attn_weights else attn
        if self.batch_first:
            out = out.transpose(1, 2).reshape(n, tgt, self.embed_dim)
        else:
            out = out.permute(2, 0, 1, 3).reshape(tgt, n, self.embed_dim)
        return self.out_proj(out), weights

    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` with the effective (merged) weights."""
        w, b = self.in_proj_weight.detach(), self.in_proj_bias
        o_w, o_b = effective_linear(self.out_proj)
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=b is not None,
                                    batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(w)
            mha.out_proj.weight.copy_(o_w)
            if b is not None:
                mha.in_proj_bias.copy_(b)
                mha.out_proj.bias.copy_(o_b)
        return mha.requires_grad_(False)


class SplitQKV(nn.Module):
    """timm's fused ``qkv`` Linear as three Linears ``q`` / ``k`` / ``v`` (views, no copy) whose
    outputs are concatenated — the same output, with a Linear per projection for peft."""

    def __init__(self, qkv: nn.Linear) -> None:
        super().__init__()
        if qkv.out_features % 3:
            raise ModelError(f"qkv Linear with {qkv.out_features} outputs cannot be split into q, k, v")
        ws = qkv.weight.chunk(3)
        bs = qkv.bias.chunk(3) if qkv.bias is not None else (None, None, None)
        self.q, self.k, self.v = (_view_linear(w, b) for w, b in zip(ws, bs))
        self.in_features, self.out_features = qkv.in_features, qkv.out_features

    @property
    def weight(self) -> Tensor:
        return torch.cat([effective_linear(p)[0] for p in (self.q, self.k, self.v)])

    @property
    def bias(self) -> Tensor | None:
        biases = [effective_linear(p)[1] for p in (self.q, self.k, self.v)]
        return None if biases[0] is None else torch.cat(biases)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def to_linear(self) -> nn.Linear:
        w, b = self.weight.detach(), self.bias
        out = nn.Linear(self.in_features, self.out_features, bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if b is not None:
                out.bias.copy_(b)
        return out.requires_grad_(False)


def _register_with_attention_relevance() -> None:
    from ..saliency.explicit import register_attention_forward

    register_attention_forward(SplitAttention, lambda mod, record: partial(mod.forward, record=record))


_register_with_attention_relevance()
