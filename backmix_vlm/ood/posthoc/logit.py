"""Scores of the logits alone: entropy, temperature scaling, KL-matching."""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from ...errors import ConfigError
from ..scores import Score, ScoreSetup, _positive, _register
from ._common import not_set_up, train_outputs


@_register("entropy")
class Entropy(Score):
    """Negative Shannon entropy of the softmax, ``sum_k p_k log p_k`` (nats; pytorch-ood's ``Entropy``
    returns ``+H`` as an outlier score).  Higher = a peakier prediction = more likely known."""

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        logp = outputs["logits"].double().log_softmax(dim=-1)
        return (logp.exp() * logp).sum(dim=-1)


def fit_temperature(logits: Tensor, labels: Tensor, *, lo: float = 1e-3, hi: float = 1e3) -> float:
    """The temperature ``T`` minimising the mean NLL of ``softmax(logits / T)`` at ``labels``.

    The NLL is convex in ``beta = 1 / T`` with derivative ``mean(E_p[z] - z_y)``, increasing in beta,
    so bisection on ``log beta`` over ``[1/hi, 1/lo]`` finds the minimum to float64 precision.  A
    minimum outside ``[lo, hi]`` (training logits that are separable drive ``T -> 0``) is refused.
    """
    z = logits.double()
    y = labels.long()
    zy = z.gather(1, y[:, None]).squeeze(1)

    def slope(beta: float) -> float:
        p = (beta * z).softmax(dim=-1)
        return float(((p * z).sum(dim=-1) - zy).mean())

    a, b = math.log(1.0 / hi), math.log(1.0 / lo)
    if slope(math.exp(b)) < 0:
        raise ConfigError(f"tempscale: the NLL of the training logits still falls at T = {lo:g} (the training set is "
                          f"fit almost perfectly, so no temperature is optimal there); give "
                          f"score_params.tempscale.temperature")
    if slope(math.exp(a)) > 0:
        raise ConfigError(f"tempscale: the NLL of the training logits is minimal above T = {hi:g} (the logits "
                          f"do not predict the labels); give score_params.tempscale.temperature")
    for _ in range(80):
        m = 0.5 * (a + b)
        if slope(math.exp(m)) < 0:
            a = m
        else:
            b = m
    return 1.0 / math.exp(0.5 * (a + b))


@_register("tempscale")
class TempScale(Score):
    """Temperature scaling (Guo et al. 2017): the MSP of ``logits / T``.

    ``T`` minimises the NLL of the ID training outputs' logits at their labels
    (:func:`fit_temperature`, exact 1-D minimum), or is given as ``temperature`` (then no
    training outputs are needed, e.g. in a zero-shot run).  OpenOOD fits T on the ID
    validation split with 50 L-BFGS steps (lr 0.01) from T = 1.5.
    """

    def __init__(self, temperature: float | None = None) -> None:
        self.temperature = None if temperature is None else _positive(temperature, "tempscale temperature")
        self.uses = () if self.temperature is not None else ("train",)
        self._t: float | None = self.temperature

    def _setup(self, inputs: ScoreSetup) -> None:
        if self.temperature is not None:
            return
        train = train_outputs(self, inputs.train, ("logits", "labels"))
        self._t = fit_temperature(train["logits"], train["labels"])

    @property
    def fitted_temperature(self) -> float | None:
        return self._t

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._t is None:
            raise not_set_up(self.name, "training logits + labels, or a temperature")
        return (outputs["logits"].double() / self._t).softmax(dim=-1).amax(dim=-1)


@_register("klm")
class KLMatching(Score):
    """KL-matching (Hendrycks et al. 2022): ``-min_k KL(p(x) || d_k)``.

    ``d_k`` = the mean softmax of the training samples *predicted* as class k (labels are not
    used); a class nobody is predicted as gets the one-hot template, as in OpenOOD (whose
    templates come from the ID validation split; here the training set).
    """

    uses = ("train",)

    def __init__(self) -> None:
        self._log_templates: Tensor | None = None

    def _setup(self, inputs: ScoreSetup) -> None:
        train = train_outputs(self, inputs.train, ("logits",))
        p = train["logits"].double().softmax(dim=-1)
        k = p.shape[1]
        pred = p.argmax(dim=-1)
        templates = torch.eye(k, dtype=torch.float64)
        for c in range(k):
            mask = pred == c
            if mask.any():
                templates[c] = p[mask].mean(dim=0)
        # log 0 -> a huge finite negative: KL = "infinity" for p > 0 and 0 * it = 0 where p = 0
        self._log_templates = templates.log().clamp_min(-1e200)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._log_templates is None:
            raise not_set_up(self.name, "training logits")
        logp = outputs["logits"].double().log_softmax(dim=-1)
        p = logp.exp()
        kl = (p * logp).sum(dim=-1, keepdim=True) - p @ self._log_templates.T   # (N, K): KL(p || d_k)
        return -kl.amin(dim=-1)
