"""Gradient-free patch-to-text similarity maps."""
from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from backmix_vlm.errors import ConfigError, ModelError
from backmix_vlm.models.clip import TINY_CLIP, encode_image_global_local
from backmix_vlm.saliency.local import LocalSimilarity, local_similarity_maps, patch_text_cosine


def loop_maps(local: torch.Tensor, text: torch.Tensor, targets: torch.Tensor, mode: str, scale: float) -> torch.Tensor:
    """Direct computation, one image and one patch at a time."""
    out = torch.zeros(local.shape[:2])
    for b in range(local.shape[0]):
        for p in range(local.shape[1]):
            cos = torch.stack([F.cosine_similarity(local[b, p], t, dim=0) for t in text])
            out[b, p] = cos[targets[b]] if mode == "cosine" else torch.softmax(scale * cos, 0)[targets[b]]
        out[b] = (out[b] - out[b].min()) / (out[b].max() - out[b].min())
    return out


@pytest.mark.parametrize("mode", ["softmax", "cosine"])
def test_maps_equal_direct_computation(mode: str) -> None:
    torch.manual_seed(0)
    local, text = torch.randn(3, 6, 8), torch.randn(4, 8)
    targets = torch.tensor([0, 3, 1])
    maps = local_similarity_maps(patch_text_cosine(local, text), targets, grid=(2, 3), mode=mode, logit_scale=10.0)
    assert maps.shape == (3, 2, 3) and maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps.view(3, 6), loop_maps(local, text, targets, mode, 10.0), atol=1e-5, rtol=1e-5)


def test_softmax_ranks_class_specific_patches_above_generic_ones() -> None:
    # patch 0 matches only class 0; patch 1 matches both classes equally (a "generic" patch)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    local = torch.tensor([[[1.0, 0.2], [1.0, 1.0], [-1.0, 0.0], [0.0, 1.0]]])
    cos = patch_text_cosine(local, text)
    soft = local_similarity_maps(cos, torch.tensor([0]), grid=(2, 2), mode="softmax", logit_scale=100.0)
    raw = local_similarity_maps(cos, torch.tensor([0]), grid=(2, 2), mode="cosine")
    assert soft[0, 0, 0] == 1 and soft[0, 0, 1] < 0.6  # generic patch: p = 0.5 of the way
    assert raw[0, 0, 1] > 0.7  # cosine alone still calls it foreground


def test_local_similarity_on_tiny_clip_matches_features_and_local_cosine() -> None:
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([2, 0])
    text = F.normalize(torch.randn(3, 32), dim=-1)
    maps = LocalSimilarity(model, text, encode=encode_image_global_local)(images, targets)
    assert maps.shape == (2, 4, 4) and maps.dtype == torch.float32
    with torch.no_grad():
        _, local = encode_image_global_local(model, images)
    scale = float(model.logit_scale.detach().exp())
    torch.testing.assert_close(maps.view(2, 16), loop_maps(local, text, targets, "softmax", scale), atol=1e-5, rtol=1e-5)
    # the same maps straight from a forward's (B, P, K) local cosines (ModelOutput.local_cosine)
    local_cosine = F.normalize(local, dim=-1) @ text.T
    torch.testing.assert_close(local_similarity_maps(local_cosine, targets, logit_scale=scale), maps)
    assert all(p.grad is None for p in model.parameters())


def test_bad_input_is_reported() -> None:
    cos = torch.rand(2, 6, 3)
    with pytest.raises(ConfigError, match="'gradcam' is not accepted; choose one of softmax, cosine"):
        local_similarity_maps(cos, torch.tensor([0, 1]), grid=(2, 3), mode="gradcam")
    with pytest.raises(ModelError, match=r"class ids in \[0, 2\]"):
        local_similarity_maps(cos, torch.tensor([0, 3]), grid=(2, 3))
    with pytest.raises(ModelError, match="square grid"):
        local_similarity_maps(cos, torch.tensor([0, 1]))
    with pytest.raises(ModelError, match="2 targets for 3 images"):
        local_similarity_maps(torch.rand(3, 4, 3), torch.tensor([0, 1]))
    # a map with no ranking (one class: softmax is 1 everywhere) becomes zeros
    flat = local_similarity_maps(torch.rand(1, 4, 1), torch.tensor([0]))
    assert torch.equal(flat, torch.zeros(1, 2, 2))
