"""The one output type every model / adapter returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """Per-batch model output.

    logits:        (B, K) class logits (for CLIP: logit_scale * cosine similarity).
    features:      (B, D) penultimate / image-embedding features (unnormalised).
    local_logits:  (B, P, K) per-patch class logits (CLIP local features; LoCoOp, GL-MCM).
    cam:           (B, K, h, w) class activation maps (Conv1x1-GAP heads), pre-softmax.
    cosine:        (B, K) raw cosine similarities (CLIP), what MCM uses at T = 1.
    local_cosine:  (B, P, K) raw per-patch cosines (CLIP), what GL-MCM uses.
    """

    logits: torch.Tensor
    features: torch.Tensor | None = None
    local_logits: torch.Tensor | None = None
    cam: torch.Tensor | None = None
    cosine: torch.Tensor | None = None
    local_cosine: torch.Tensor | None = None
