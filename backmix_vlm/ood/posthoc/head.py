"""Closed forms over the final layer's weights: fDBD, GradNorm."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
from torch import Tensor

from ..scores import Score, ScoreSetup, _positive, _register
from ._common import not_set_up, train_outputs

if TYPE_CHECKING:
    from ...models.heads import LinearHead


@_register("fdbd")
class FDBD(Score):
    """fDBD (Liu & Qin 2024): mean distance to the decision boundaries, regularised.

    With ``z = W x + b`` and ``c`` its argmax, the distance from ``x`` to the boundary between
    ``c`` and ``j`` is ``(z_c - z_j) / ||w_c - w_j||``; score = their sum over ``j != c`` divided by
    ``||x - mean_train(x)||`` (``distance_as_normalizer: true``, the paper and OpenOOD's default)
    or by ``||x||`` (``false``: no training data needed).  OpenOOD sums over all K classes with
    the ``j = c`` term 0; so do we (the sum, not the paper's mean over K - 1: the same ranking).
    """

    requires = ("features",)

    def __init__(self, distance_as_normalizer: bool = True) -> None:
        self.distance_as_normalizer = bool(distance_as_normalizer)
        self.uses = ("train", "head") if self.distance_as_normalizer else ("head",)
        self._head: "LinearHead | None" = None
        self._mean: Tensor | None = None
        self._denominator: Tensor | None = None

    def _setup(self, inputs: ScoreSetup) -> None:
        head = self._head = inputs.head
        assert head is not None
        if self.distance_as_normalizer:
            self._mean = train_outputs(self, inputs.train, ("features",))["features"].double().mean(dim=0)
        w = head.weight.double()
        denominator = torch.cdist(w, w)   # ||w_c - w_j||, (K, K)
        denominator.fill_diagonal_(1.0)
        self._denominator = denominator

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._head is None or self._denominator is None:
            raise not_set_up(self.name, "the final linear layer")
        x = outputs["features"].double().cpu()
        z = self._head(x)
        top, pred = z.max(dim=1)
        boundary = ((top[:, None] - z) / self._denominator[pred]).sum(dim=1)
        norm = (x - self._mean if self._mean is not None else x).norm(dim=1)
        return boundary / norm


@_register("gradnorm")
class GradNorm(Score):
    """GradNorm (Huang et al. 2021): L1 norm of the final layer's weight gradient of the KL
    divergence between the softmax of ``z / T`` and the uniform distribution.

    The authors' loss ``-sum_k log softmax(z / T)_k`` has ``dL/dz_j = (K p_j - 1) / T`` and
    ``dL/dW = (dL/dz) x^T``, so ``||dL/dW||_1 = ||K p - 1||_1 ||x||_1 / T``: computed in closed form,
    equal to the reference's per-sample backward pass.  T = 1 (the paper and OpenOOD).
    """

    requires = ("features",)
    uses = ("head",)

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive(temperature, "gradnorm temperature")
        self._head: "LinearHead | None" = None

    def _setup(self, inputs: ScoreSetup) -> None:
        self._head = inputs.head

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._head is None:
            raise not_set_up(self.name, "the final linear layer")
        x = outputs["features"].double().cpu()
        p = (self._head(x) / self.temperature).softmax(dim=-1)
        k = p.shape[1]
        return (k * p - 1).abs().sum(dim=1) * x.abs().sum(dim=1) / self.temperature
