"""Scores that re-run the final layer on shaped inputs: SCALE (features), DICE (weights)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError
from ..scores import Score, ScoreSetup, _percentile, _register, kept_count
from ._common import energy, not_set_up, train_outputs

if TYPE_CHECKING:
    from ...models.heads import LinearHead


def scale_features(x: Tensor, percentile: float, key: str = "score_params.scale.percentile") -> Tensor:
    """SCALE's shaping (Xu et al. 2024) of pooled features ``x`` (N, D): ``x * exp(s1 / s2)``.

    ``s1`` = the row sum, ``s2`` = the sum of its ``k = D - round(D p / 100)`` largest entries;
    unlike ASH-S nothing is pruned, only rescaled.  A percentile that keeps none is refused.
    """
    k = kept_count(x.shape[1], percentile, key)
    s1 = x.sum(dim=1, keepdim=True)
    s2 = x.topk(k, dim=1).values.sum(dim=1, keepdim=True)
    return x * torch.exp(s1 / s2)


@_register("scale")
class SCALE(Score):
    """SCALE (Xu et al. 2024): energy of ``W scale(x) + b`` (:func:`scale_features`).

    p = 85 (OpenOOD's ``scale.yml``; the paper's ImageNet setting).  Like ASH it assumes
    non-negative (post-ReLU) features.
    """

    requires = ("features",)
    uses = ("head",)

    def __init__(self, percentile: float = 85.0) -> None:
        self.percentile = _percentile(percentile, "scale percentile", upper_open=True)
        self._head: "LinearHead | None" = None

    def _setup(self, inputs: ScoreSetup) -> None:
        self._head = inputs.head
        assert self._head is not None
        kept_count(self._head.in_features, self.percentile, "score_params.scale.percentile")

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._head is None:
            raise not_set_up(self.name, "the final linear layer")
        x = scale_features(outputs["features"].double().cpu(), self.percentile)
        return energy(self._head(x))


@_register("dice")
class DICE(Score):
    """DICE (Sun & Li 2022): energy of the logits through a sparsified final layer.

    Contribution ``V = mean_train(x)[None, :] * W`` (K, D); keep the weights whose contribution
    is above the ``p``-th percentile of all K*D entries (numpy's linear interpolation), zero the
    rest, score = ``logsumexp(x @ (W * mask).T + b)``.  p = 90 (the paper's CIFAR setting,
    OpenOOD's ``dice.yml``; the paper's ImageNet setting is 70).  A percentile that keeps no
    weight (p = 100, or ties at the top) is refused.
    """

    requires = ("features",)
    uses = ("train", "head")

    def __init__(self, percentile: float = 90.0) -> None:
        self.percentile = _percentile(percentile, "dice percentile")
        self._weight: Tensor | None = None
        self._bias: Tensor | None = None

    def _setup(self, inputs: ScoreSetup) -> None:
        head = inputs.head
        assert head is not None
        train = train_outputs(self, inputs.train, ("features",))
        mean = train["features"].double().mean(dim=0)
        w = head.weight.double()
        contrib = (mean[None, :] * w).numpy()
        thresh = np.percentile(contrib, self.percentile)
        mask = torch.from_numpy(contrib > thresh)
        kept = int(mask.sum())
        if kept == 0:
            raise ConfigError(f"score_params.dice.percentile = {self.percentile:g} keeps 0 of {contrib.size} weights "
                              f"(none has a contribution above the percentile); choose a lower percentile")
        self._weight, self._bias = w * mask, head.bias.double()

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._weight is None or self._bias is None:
            raise not_set_up(self.name, "training features + the final linear layer")
        x = outputs["features"].double().cpu()
        return energy(x @ self._weight.T + self._bias)
