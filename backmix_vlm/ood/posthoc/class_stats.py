"""Scores fit on statistics of the training features: RMDS, SHE, NNGuide."""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from ..scores import Score, ScoreSetup, _register
from ._common import not_set_up, positive_int, train_outputs


def _precision(centered: Tensor) -> Tensor:
    """scikit-learn's ``EmpiricalCovariance().precision_``: pinvh of the 1/N covariance."""
    cov = centered.T @ centered / centered.shape[0]
    return torch.linalg.pinv(cov, hermitian=True)


def _sq_mahalanobis(x: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """``(x - mu_c)^T P (x - mu_c)`` for every (sample, mean): (N, C)."""
    return ((x @ precision) * x).sum(-1, keepdim=True) - 2 * x @ precision @ means.T + ((means @ precision) * means).sum(-1)


@_register("rmds")
class RMDS(Score):
    """Relative Mahalanobis distance (Ren et al. 2021): ``max_c [-MD_c(x) + MD_0(x)]``.

    ``MD_c``: squared distance to class mean ``mu_c`` under the tied class covariance (as
    ``mahalanobis``); ``MD_0``: squared distance to the mean of all training features under
    their own covariance (the "background" Gaussian).  Both 1/N maximum-likelihood covariances
    inverted with a pseudo-inverse (scikit-learn's ``EmpiricalCovariance``, as OpenOOD).
    Classes = those present in the training labels.
    """

    requires = ("features",)
    uses = ("train",)

    def __init__(self) -> None:
        self._stats: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _setup(self, inputs: ScoreSetup) -> None:
        train = train_outputs(self, inputs.train, ("features", "labels"))
        x, y = train["features"].double(), train["labels"].long()
        classes = torch.unique(y)
        means = torch.stack([x[y == c].mean(dim=0) for c in classes])
        precision = _precision(x - means[torch.searchsorted(classes, y)])
        whole = x.mean(dim=0, keepdim=True)
        self._stats = (means, precision, whole, _precision(x - whole))

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._stats is None:
            raise not_set_up(self.name, "training features + labels")
        means, precision, whole, whole_precision = self._stats
        x = outputs["features"].double().cpu()
        background = _sq_mahalanobis(x, whole, whole_precision)        # (N, 1)
        return (background - _sq_mahalanobis(x, means, precision)).amax(dim=-1)


SHE_METRICS = ("inner_product", "euclidean", "cosine")


@_register("she")
class SHE(Score):
    """Simplified Hopfield energy (Zhang et al. 2023): similarity to the predicted class's pattern.

    Pattern of class c = the mean training feature of the samples labelled c *and* predicted c
    (OpenOOD); a class with no such sample uses all its samples, one with no sample at all a
    zero pattern (OpenOOD would give NaN).  ``metric``: ``inner_product`` (default, the paper
    and OpenOOD), ``euclidean`` (minus the distance) or ``cosine``.
    """

    requires = ("logits", "features")
    uses = ("train",)

    def __init__(self, metric: str = "inner_product") -> None:
        if metric not in SHE_METRICS:
            raise ConfigError(f"score_params.she.metric = {metric!r}; choose one of {', '.join(SHE_METRICS)}")
        self.metric = metric
        self._patterns: Tensor | None = None

    def _setup(self, inputs: ScoreSetup) -> None:
        train = train_outputs(self, inputs.train, ("logits", "features", "labels"))
        x, y = train["features"].double(), train["labels"].long()
        pred = train["logits"].argmax(dim=-1)
        patterns = torch.zeros(train["logits"].shape[1], x.shape[1], dtype=torch.float64)
        for c in range(patterns.shape[0]):
            mask = (y == c) & (pred == c)
            if not mask.any():
                mask = y == c
            if mask.any():
                patterns[c] = x[mask].mean(dim=0)
        self._patterns = patterns

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._patterns is None:
            raise not_set_up(self.name, "training features, logits + labels")
        x = outputs["features"].double().cpu()
        target = self._patterns[outputs["logits"].argmax(dim=-1).cpu()]
        if self.metric == "inner_product":
            return (x * target).sum(dim=1)
        if self.metric == "euclidean":
            return -(x - target).norm(dim=1)
        return F.cosine_similarity(x, target, dim=1)


@_register("nnguide")
class NNGuide(Score):
    """Nearest-neighbour guidance (Park et al. 2023): ``energy(x) * mean top-k <z, b_i>``.

    Bank ``b_i = z_i * energy_i`` over a random ``alpha`` share of the training samples
    (``z = x / ||x||``, ``energy = logsumexp(logits)``); the score multiplies the sample's energy
    by the mean of its ``k`` largest inner products with the bank.  k = 100, alpha = 0.01 (OpenOOD's
    ``nnguide.yml``; OpenOOD takes the first batches of its shuffled training loader, we draw the
    subset with ``seed``).  The bank must hold at least ``k`` samples.
    """

    requires = ("logits", "features")
    uses = ("train",)

    def __init__(self, k: int = 100, alpha: float = 0.01, seed: int = 0) -> None:
        self.k = positive_int(k, "nnguide k")
        if not 0 < alpha <= 1:
            raise ConfigError(f"score_params.nnguide.alpha must be in (0, 1], got {alpha!r}")
        self.alpha, self.seed = float(alpha), int(seed)
        self._bank: Tensor | None = None

    def _setup(self, inputs: ScoreSetup) -> None:
        train = train_outputs(self, inputs.train, ("logits", "features"))
        n = train["features"].shape[0]
        m = min(n, math.ceil(self.alpha * n))
        if m < self.k:
            raise ConfigError(f"score_params.nnguide: the bank (alpha = {self.alpha:g} of {n} training samples = {m}) "
                              f"is smaller than k = {self.k}; raise alpha or lower k")
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:m].sort().values
        z = F.normalize(train["features"][idx].double(), dim=-1)
        self._bank = z * torch.logsumexp(train["logits"][idx].double(), dim=-1, keepdim=True)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._bank is None:
            raise not_set_up(self.name, "training features + logits")
        z = F.normalize(outputs["features"].double().cpu(), dim=-1)
        guide = torch.cat([(z[i:i + 1024] @ self._bank.T).topk(self.k, dim=1).values.mean(dim=1)
                           for i in range(0, z.shape[0], 1024)])
        return torch.logsumexp(outputs["logits"].double().cpu(), dim=-1) * guide
