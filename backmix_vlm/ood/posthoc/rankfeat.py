"""RankFeat (Song et al. 2022): energy after removing the rank-1 part of the last feature map."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ..scores import Score, ScoreSetup, _positive, _register
from ._common import energy


def remove_rank1(fmap: Tensor) -> Tensor:
    """``X - s_1 u_1 v_1^T`` for each sample's (C, H*W) matrix of a (B, C, H, W) map (exact SVD, float32+)."""
    b, c, h, w = fmap.shape
    x = fmap.reshape(b, c, h * w)
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (x - s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).reshape(b, c, h, w)


def feature_map_model(forward: Any) -> nn.Module | None:
    """The model behind ``forward`` when it exposes its last feature map and a head over it
    (``forward_features(x) -> (B, C, H, W)``, ``head(fmap) -> (logits, cam)``: the CAM CNNs)."""
    from ...models.cnn import CamHead

    model = forward
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP / accelerate wrappers
        model = model.module
    ok = callable(getattr(model, "forward_features", None)) and isinstance(getattr(model, "head", None), CamHead)
    return model if ok else None


@_register("rankfeat")
class RankFeat(Score):
    """RankFeat: ``T logsumexp(head(X - s_1 u_1 v_1^T) / T)`` on the last feature map X.

    Runs the model (``forward``) on the images: the feature map is not among the cached
    outputs.  Available on models that expose it (:func:`feature_map_model`: the CNNs with a
    Conv1x1-GAP head); others are refused at setup.  The authors' default ResNet-50 score also
    averages the logits of the same removal at block 3 (OpenOOD's too); we apply it to the last
    map only (the paper's "Block 4" row), by exact SVD (OpenOOD's ``accelerate: false``), T = 1.
    Test-time augmentation of the model (``tta``) is not applied to this score.
    """

    requires = ()
    uses = ("forward",)

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive(temperature, "rankfeat temperature")
        self._model: nn.Module | None = None

    def _setup(self, inputs: ScoreSetup) -> None:
        model = feature_map_model(inputs.forward)
        if model is None:
            raise ConfigError(f"score 'rankfeat' needs the model's last feature map (a model with forward_features "
                              f"-> (B, C, H, W) and a Conv1x1-GAP head: the toolkit's CNNs); "
                              f"{type(inputs.forward).__name__} does not expose it")
        self._model = model

    def image_scores(self, images: Tensor) -> Tensor:
        if self._model is None:
            raise ConfigError("score 'rankfeat' runs the model: call setup(ScoreSetup(forward=model)) first")
        with torch.no_grad():
            fmap = self._model.forward_features(images)
            logits, _ = self._model.head(remove_rank1(fmap).to(fmap.dtype))  # type: ignore[operator]
            return energy(logits.float(), self.temperature)

    def postprocess(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if outputs.get(self.name) is None:
            raise ConfigError("score 'rankfeat' runs the model on the images (its feature map is not a cached "
                              "output); run it through ScoringPipeline, set up with the model")
        return outputs[self.name].float()
