"""Gradient-free foreground maps from CLIP's local (patch) features.

CLIP's patch tokens, taken through LoCoOp's value path
(:func:`backmix_vlm.models.clip.encode_image_global_local`), live in the same space as the
class text embeddings, so each patch can be scored against the image's ground-truth class
with no backward at all.  Two scores (``mode``):

* ``"softmax"`` (default): ``softmax_k(logit_scale · cos(local_p, text_k))`` at ``k = y`` — the
  transformer analogue of the paper's CAM (a pixel-wise SoftMax across class channels, GT
  channel kept), and the same per-patch class probability LoCoOp uses to find background
  patches.  It asks "is this patch *this* class rather than another", so a patch that looks
  like every prompt equally (sky, texture) scores low.
* ``"cosine"``: ``cos(local_p, text_y)`` alone — no competition between classes.

Either way each map is min-max normalised per image to [0, 1] like the attention maps
(:func:`~backmix_vlm.saliency.relevance.minmax_normalize`: constant maps become zeros), so a
mask bank sees the same range whichever source fills it.

When the training forward already returns ``ModelOutput.local_cosine`` (CoOp / LoCoOp heads
built on :func:`encode_image_global_local`), :func:`local_similarity_maps` turns it into maps
for free; :class:`LocalSimilarity` runs its own ``no_grad`` CLIP pass otherwise (the pass is
handed in as ``encode``, so this module does not import the models).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from ..validation import check_choice
from .relevance import minmax_normalize

LOCAL_MODES = ("softmax", "cosine")


def patch_text_cosine(local_features: Tensor, text_features: Tensor) -> Tensor:
    """(B, P, D) patch embeddings × (K, D) text embeddings → (B, P, K) cosine similarities."""
    local = F.normalize(local_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    return local @ text.t()


def _square_grid(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ModelError(f"{num_patches} patches do not form a square grid; pass grid=(gh, gw) explicitly")
    return side, side


def local_similarity_maps(
    local_cosine: Tensor,
    targets: Tensor,
    grid: tuple[int, int] | None = None,
    mode: str = "softmax",
    logit_scale: float | Tensor = 100.0,
) -> Tensor:
    """Per-patch GT-class score maps (B, gh, gw) in [0, 1] from (B, P, K) patch-text cosines.

    ``logit_scale`` is CLIP's temperature (``model.logit_scale.exp()``, 100 when trained);
    only ``mode="softmax"`` uses it.
    """
    check_choice(mode, LOCAL_MODES, "local similarity mode")
    if local_cosine.dim() != 3:
        raise ModelError(f"local_cosine must be (B, P, K), got shape {tuple(local_cosine.shape)}")
    batch, patches, classes = local_cosine.shape
    targets = torch.as_tensor(targets, device=local_cosine.device).long().view(-1)
    if targets.shape[0] != batch:
        raise ModelError(f"{targets.shape[0]} targets for {batch} images")
    if batch and (int(targets.min()) < 0 or int(targets.max()) >= classes):
        raise ModelError(f"targets must be class ids in [0, {classes - 1}], got {targets.tolist()}")
    gh, gw = grid if grid is not None else _square_grid(patches)
    if gh * gw != patches:
        raise ModelError(f"grid {gh}x{gw} does not hold {patches} patches")
    cos = local_cosine.detach().float()
    if mode == "softmax":
        scale = torch.as_tensor(logit_scale, dtype=cos.dtype, device=cos.device)
        cos = (scale * cos).softmax(dim=-1)
    index = targets.view(batch, 1, 1).expand(batch, patches, 1)
    score = cos.gather(2, index).squeeze(2)
    return minmax_normalize(score.view(batch, gh, gw))


class LocalSimilarity:
    """Gradient-free map source: one ``no_grad`` CLIP forward → (B, gh, gw) maps in [0, 1].

    The maps are :func:`local_similarity_maps` of the patch-text cosines.  ``encode(model, images)
    -> (global, local)`` is the CLIP pass that gives the patch features
    (:func:`backmix_vlm.models.clip.encode_image_global_local`); ``text_features`` (K, D): class
    text embeddings (e.g. CoOp's current prompts, detached); ``logit_scale`` defaults to
    ``model.logit_scale.exp()``, ``grid`` to the image size over ``model.visual.patch_size``.
    """

    def __init__(
        self,
        model: nn.Module,
        text_features: torch.Tensor,
        mode: str = "softmax",
        logit_scale: float | torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
        *,
        encode: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]],
    ) -> None:
        check_choice(mode, LOCAL_MODES, "local similarity mode")
        self.model = model
        self.encode = encode
        self.text_features = text_features.detach()
        self.mode = mode
        if logit_scale is None:
            scale = getattr(model, "logit_scale", None)
            logit_scale = scale.detach().exp() if isinstance(scale, torch.Tensor) else 100.0
        self.logit_scale = logit_scale
        self.grid = grid

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _, local = self.encode(self.model, images)
        grid = self.grid
        if grid is None:
            visual = getattr(self.model, "visual", self.model)
            ph, pw = getattr(visual, "patch_size", (None, None))
            if ph and pw:
                grid = (images.shape[-2] // ph, images.shape[-1] // pw)
        cosine = patch_text_cosine(local, self.text_features.to(local.device))
        return local_similarity_maps(cosine, targets, grid, self.mode, self.logit_scale)
