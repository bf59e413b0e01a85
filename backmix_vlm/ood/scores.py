"""OOD / open-set scores by name (OpenOOD-style postprocessors).

A score maps a dict of model outputs (the :class:`~backmix_vlm.models.output.ModelOutput`
fields plus ``labels``, as :func:`backmix_vlm.ood.features.extract_outputs` returns them)
to one number per sample, **higher = more likely known**.  Scores read cached outputs, so
one forward pass over each dataset serves every score; only ODIN needs the model itself
(``needs_model = True``, :meth:`ODIN.score_images`).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry

SCORES: Registry[type["Score"]] = Registry("score")

# Which models fill each output key: shown when a score asks for one that is absent.
PROVIDERS = {
    "logits": "every model",
    "features": "every model (CNN penultimate layer, ViT / CLIP image embedding)",
    "labels": "extract_outputs (the dataset labels)",
    "cosine": "CLIP models and CLIP prompt adapters (zero-shot CLIP, CoOp, LoCoOp)",
    "local_cosine": "CLIP models with patch-level features (zero-shot CLIP, CoOp, LoCoOp)",
    "local_logits": "CLIP models with patch-level features (zero-shot CLIP, CoOp, LoCoOp)",
    "cam": "CNNs with a Conv1x1-GAP CAM head",
}


class Score:
    """Base class: ``score(outputs) -> Tensor[N]``, higher = more likely known."""

    name: str = ""
    requires: tuple[str, ...] = ("logits",)
    needs_model: bool = False

    def fit(self, train_outputs: Mapping[str, Tensor]) -> None:
        """Learn training statistics (no-op for most scores)."""

    def score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        self.check(outputs, self.requires)
        return self._score(outputs).float()

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def check(self, outputs: Mapping[str, Tensor], keys: tuple[str, ...]) -> None:
        """Fail clearly when an output this score reads is absent (e.g. MCM on a CNN)."""
        for key in keys:
            if outputs.get(key) is None:
                have = ", ".join(k for k, v in outputs.items() if v is not None) or "nothing"
                raise ConfigError(
                    f"score '{self.name}' needs the model output '{key}', which "
                    f"{PROVIDERS.get(key, 'no known model')} provide(s); this model gave: {have}. "
                    f"Pick scores this model supports (e.g. msp, maxlogit, energy)."
                )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def get_score(name: str, **params: Any) -> Score:
    """Build the score registered as ``name`` with its parameters (e.g. ``temperature=2``)."""
    cls = SCORES.get(name)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind in kinds and p.name != "self"]
    unknown = [k for k in params if k not in accepted]
    if unknown:
        raise ConfigError(
            f"score '{name}' got unknown parameter(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    return cls(**params)


def _register(name: str) -> Callable[[type[Score]], type[Score]]:
    def deco(cls: type[Score]) -> type[Score]:
        cls.name = name
        return SCORES.register(name)(cls)

    return deco


def _positive(value: float, what: str) -> float:
    if not value > 0:
        raise ConfigError(f"{what} must be > 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- logit scores
@_register("msp")
class MSP(Score):
    """Maximum softmax probability (Hendrycks & Gimpel 2017): the paper's default score."""

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return outputs["logits"].float().softmax(dim=-1).amax(dim=-1)


@_register("maxlogit")
class MaxLogit(Score):
    """Maximum logit (Vaze et al. 2022, Hendrycks et al. 2022): no softmax normalisation."""

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return outputs["logits"].float().amax(dim=-1)


@_register("energy")
class Energy(Score):
    """Negative free energy (Liu et al. 2020): ``T * logsumexp(logits / T)``."""

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive(temperature, "energy temperature")

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        t = self.temperature
        return t * torch.logsumexp(outputs["logits"].float() / t, dim=-1)


@_register("odin")
class ODIN(Score):
    """ODIN (Liang et al. 2018): temperature scaling + a small input perturbation.

    The input moves by ``epsilon`` in the direction that raises the temperature-scaled
    softmax of the predicted class, ``x' = x - epsilon * sign(-grad_x log S_yhat(x; T))``,
    then the score is the MSP at ``T``.  Inputs are normalised tensors: with ``std=None``
    the step is ``epsilon`` in normalised space; pass the transform's per-channel ``std`` to
    get the reference code's pixel-space step (``epsilon / std`` in normalised space).  A
    zero gradient counts as a positive sign, as in the reference (``torch.ge(grad, 0)``).

    The perturbation needs gradients through the model, so cached outputs are not enough:
    use :meth:`score_images`; :meth:`score` works only for ``epsilon = 0`` (pure scaling).
    """

    needs_model = True

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014,
                 std: tuple[float, ...] | list[float] | None = None) -> None:
        self.temperature = _positive(temperature, "odin temperature")
        if epsilon < 0:
            raise ConfigError(f"odin epsilon must be >= 0, got {epsilon!r}")
        self.epsilon = float(epsilon)
        self.std = tuple(float(s) for s in std) if std is not None else None

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self.epsilon != 0:
            raise ConfigError(
                "score 'odin' perturbs the input images, so it cannot run on cached outputs; "
                "compute it with ODIN.score_images(forward, images) (runners pass the result "
                "to evaluate_open_set as extra_scores) or set epsilon: 0"
            )
        return (outputs["logits"].float() / self.temperature).softmax(dim=-1).amax(dim=-1)

    def score_images(self, forward: Callable[[Tensor], Any], images: Tensor) -> Tensor:
        """ODIN scores of one batch; ``forward`` returns logits or a ModelOutput."""
        t = self.temperature

        def logits_of(x: Tensor) -> Tensor:
            out = forward(x)
            return (out if isinstance(out, Tensor) else out.logits).float()

        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            logits = logits_of(x)
            pred = logits.argmax(dim=-1)
            loss = F.cross_entropy(logits / t, pred, reduction="sum")  # = -sum log S_yhat(x; T)
            (grad,) = torch.autograd.grad(loss, x)
        step = torch.where(grad >= 0, 1.0, -1.0).to(images.dtype)
        if self.std is not None:
            std = torch.tensor(self.std, dtype=images.dtype, device=images.device)
            step = step / std.view(1, -1, *([1] * (images.dim() - 2)))
        with torch.no_grad():
            perturbed = images.detach() - self.epsilon * step
            return (logits_of(perturbed) / t).softmax(dim=-1).amax(dim=-1)


# ----------------------------------------------------------------------------- feature scores
@_register("mahalanobis")
class Mahalanobis(Score):
    """Mahalanobis distance to the closest class mean (Lee et al. 2018), tied covariance.

    ``fit`` estimates class means and one shared covariance (maximum likelihood, 1/N) from
    training ``features`` + ``labels``; the precision is a pseudo-inverse (plus an optional
    ``ridge`` on the diagonal) so rank-deficient features (D > N in few-shot) still work.
    Score = ``-min_c (x - mu_c)^T P (x - mu_c)`` (squared distance; monotone in the distance,
    so every metric is the same).  No input preprocessing or layer ensemble by default.
    """

    requires = ("features",)

    def __init__(self, ridge: float = 0.0) -> None:
        if ridge < 0:
            raise ConfigError(f"mahalanobis ridge must be >= 0, got {ridge!r}")
        self.ridge = float(ridge)
        self._means: Tensor | None = None
        self._precision: Tensor | None = None

    def fit(self, train_outputs: Mapping[str, Tensor]) -> None:
        self.check(train_outputs, ("features", "labels"))
        x = train_outputs["features"].double()
        y = train_outputs["labels"].long()
        classes = torch.unique(y)
        means = torch.stack([x[y == c].mean(dim=0) for c in classes])
        centered = x - means[torch.searchsorted(classes, y)]
        cov = centered.T @ centered / x.shape[0]
        cov = cov + self.ridge * torch.eye(cov.shape[0], dtype=cov.dtype)
        self._means, self._precision = means, torch.linalg.pinv(cov, hermitian=True)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        if self._means is None or self._precision is None:
            raise ConfigError("score 'mahalanobis' must be fit on training outputs (features + labels) first")
        x = outputs["features"].double()
        p, mu = self._precision, self._means
        # (x - mu)^T P (x - mu) = x^T P x - 2 x^T P mu + mu^T P mu, for every (sample, class)
        d = ((x @ p) * x).sum(-1, keepdim=True) - 2 * x @ p @ mu.T + ((mu @ p) * mu).sum(-1)
        return -d.amin(dim=-1)


@_register("featnorm")
class FeatNorm(Score):
    """L2 norm of the features: the paper's FT-Auc score (known samples have larger norms)."""

    requires = ("features",)

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return outputs["features"].float().norm(dim=-1)


# ----------------------------------------------------------------------------- CLIP scores
@_register("mcm")
class MCM(Score):
    """Maximum Concept Matching (Ming et al. 2022): max softmax of raw cosines / T (T = 1)."""

    requires = ("cosine",)

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive(temperature, "mcm temperature")

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return (outputs["cosine"].float() / self.temperature).softmax(dim=-1).amax(dim=-1)


@_register("glmcm")
class GLMCM(Score):
    """GL-MCM (Miyai et al. 2023): global MCM + the largest local MCM over patches.

    Local MCM of a patch = max over classes of softmax(local_cosine / T); the score adds the
    best patch to the global MCM, so an image with one clearly known object scores high.
    """

    requires = ("cosine", "local_cosine")

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _positive(temperature, "glmcm temperature")

    def _score(self, outputs: Mapping[str, Tensor]) -> Tensor:
        t = self.temperature
        glob = (outputs["cosine"].float() / t).softmax(dim=-1).amax(dim=-1)
        local = (outputs["local_cosine"].float() / t).softmax(dim=-1).amax(dim=-1)  # (N, P)
        return glob + local.amax(dim=-1)
