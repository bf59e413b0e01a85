"""OpenMax (Bendale & Boult 2016): Weibull-recalibrated logits with an "unknown" class.

The Weibull fits restate libmr's ``MR.fit_high`` / ``w_score`` (what OpenOOD and pytorch-ood
call): the tail is shifted so its smallest value sits at ``translate_amount`` (10000), a
two-parameter Weibull is fit by maximum likelihood, and ``w_score(d) = CDF(d + 10000 - small)``.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from ...errors import ConfigError
from ..scores import Score, ScoreSetup, _register
from ._common import not_set_up, positive_int, train_outputs

TRANSLATE = 10000.0   # libmr's default translate_amount


def weibull_mle(x: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood ``(scale, shape)`` of a two-parameter Weibull on positive samples ``x``.

    The shape solves the profile equation ``sum x^k ln x / sum x^k - 1/k - mean ln x = 0``
    (increasing in k; computed on ``x / max x``, which leaves it unchanged), the scale is
    ``(mean x^k)^(1/k)``.  Needs at least two distinct values.
    """
    x = np.asarray(x, dtype=np.float64)
    top = x.max()
    ly = np.log(x / top)                     # <= 0
    mean_ly = ly.mean()

    def profile(logk: float) -> float:
        k = math.exp(logk)
        w = np.exp(k * ly)                   # y^k in (0, 1]
        return float((w * ly).sum() / w.sum() - 1.0 / k - mean_ly)

    lo, hi = math.log(1e-6), math.log(1e12)
    if not (profile(lo) < 0 < profile(hi)):
        raise ConfigError(f"openmax: cannot fit a Weibull to {x.size} tail distances spanning "
                          f"[{x.min():g}, {top:g}] (need at least two distinct values)")
    k = math.exp(brentq(profile, lo, hi, xtol=1e-14, rtol=1e-15, maxiter=500))
    return float(top * np.exp(k * ly).mean() ** (1.0 / k)), k


def fit_high(tail: np.ndarray, translate: float = TRANSLATE) -> tuple[float, float, float]:
    """libmr ``fit_high``: ``(scale, shape, small_score)`` of the translated tail."""
    tail = np.asarray(tail, dtype=np.float64)
    small = float(tail.min())
    scale, shape = weibull_mle(tail + translate - small)
    return scale, shape, small


def w_score(x: Tensor, scale: Tensor, shape: Tensor, small: Tensor, translate: float = TRANSLATE) -> Tensor:
    """libmr ``w_score``: the Weibull CDF at ``x + translate - small`` (0 below the origin)."""
    t = (x + translate - small).clamp_min(0)
    return 1 - torch.exp(-(t / scale) ** shape)


@_register("openmax")
class OpenMax(Score):
    """OpenMax: ``-P(unknown)`` from the recalibrated logits (activation vectors = logits).

    ``setup``: per class, the mean logit vector (MAV) of the training samples labelled and
    predicted as that class, and a Weibull fit (:func:`fit_high`) to the ``tail`` largest
    Euclidean distances of those samples to it.  Score: with the ``alpha`` top classes weighted
    ``(alpha - r) / alpha`` (rank r = 0, 1, ...), ``z'_c = z_c (1 - w_c omega_c)``, unknown logit
    ``sum_c (z_c - z'_c)``; score = minus its softmax share.  tail = 20, alpha = 3, Euclidean
    distance: OpenOOD's settings (the paper: tail 20, alpha 10 for ImageNet, "eucos" distance).
    Every class needs at least three correctly classified training samples.
    """

    requires = ("logits",)
    uses = ("train",)

    def __init__(self, tail: int = 20, alpha: int = 3) -> None:
        self.tail = positive_int(tail, "openmax tail")
        self.alpha = positive_int(alpha, "openmax alpha")
        self._fit: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _setup(self, inputs: ScoreSetup) -> None:
        train = train_outputs(self, inputs.train, ("logits", "labels"))
        z, y = train["logits"].double(), train["labels"].long()
        k = z.shape[1]
        correct = z.argmax(dim=1) == y
        mavs, params = [], []
        for c in range(k):
            av = z[correct & (y == c)]
            if av.shape[0] < 3:
                raise ConfigError(f"score 'openmax': class {c} has {av.shape[0]} correctly classified training "
                                  f"sample(s); its Weibull fit needs at least 3 (two distances to their mean differ)")
            mav = av.mean(dim=0)
            dist = (av - mav).norm(dim=1).numpy()
            mavs.append(mav)
            try:
                params.append(fit_high(np.sort(dist)[-self.tail:]))
            except ConfigError as e:
                raise ConfigError(f"score 'openmax', class {c}: {e}") from None
        p = torch.tensor(params, dtype=torch.float64)
        self._fit = (torch.stack(mavs), p[:, 0], p[:, 1], p[:, 2])

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._fit is None:
            raise not_set_up(self.name, "training logits + labels")
        mavs, scale, shape, small = self._fit
        z = outputs["logits"].double().cpu()
        n, k = z.shape
        alpha = min(self.alpha, k)
        ranked = z.argsort(dim=1, descending=True)[:, :alpha]
        omega = torch.zeros_like(z).scatter_(1, ranked, torch.arange(alpha, 0, -1, dtype=z.dtype).expand(n, -1) / alpha)
        w = w_score(torch.cdist(z, mavs), scale, shape, small)   # (N, K): w_c at the distance to MAV_c
        modified = z * (1 - w * omega)
        unknown = (z - modified).sum(dim=1, keepdim=True)
        return -torch.cat([modified, unknown], dim=1).softmax(dim=1)[:, -1]
