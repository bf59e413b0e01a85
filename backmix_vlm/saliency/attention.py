"""Gradient-weighted attention relevance maps for vision transformers (import path kept).

The code lives in three modules: :mod:`.relevance` (Chefer's rule, :class:`AttentionRelevance`,
:class:`Recording`, :func:`clip_logits_fn`), :mod:`.explicit` (explicit-softmax attention
forwards: :func:`explicit_attention`, :func:`register_attention_forward`) and :mod:`.layout`
(:func:`resolve_blocks`: where a model's image blocks are).  This module re-exports their
public names.
"""
from __future__ import annotations

from .explicit import (ForwardFactory, RecordFn, attention_types, check_supported, explicit_attention,
                       register_attention_forward)
from .layout import model_grid, model_prefix_tokens, resolve_blocks
from .relevance import (
    DEFAULT_START_LAYER,
    AttentionRelevance,
    Recording,
    clip_logits_fn,
    minmax_normalize,
    relevance_from_attentions,
    relevance_to_maps,
)

__all__ = [
    "DEFAULT_START_LAYER", "AttentionRelevance", "ForwardFactory", "RecordFn", "Recording", "attention_types",
    "check_supported",
    "clip_logits_fn", "explicit_attention", "minmax_normalize", "model_grid", "model_prefix_tokens",
    "register_attention_forward", "relevance_from_attentions", "relevance_to_maps", "resolve_blocks",
]
