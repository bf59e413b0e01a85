"""Training methods: what a training-time open-set / OOD method changes in the training step.

A method is chosen by name in the train config (``method: {name: logitnorm, options:
{temperature: 0.04}}``; ``plain`` = cross-entropy) and the :class:`~.trainer.Trainer` asks it
through one small interface (:class:`TrainingMethod`):

* ``attach(model, num_classes)`` — once, before the optimizer is built: parameters the method
  owns go *into* the model (RotPred's rotation head, ARPL's reciprocal points), so the
  optimizer, checkpoints, several processes and the evaluation all see them;
* ``extra_inputs(images, outliers)`` — per step: rows appended to the (mixed) batch for the
  same forward (RotPred: the batch rotated by 90 / 180 / 270 degrees; OE: the outlier batch),
  or None;
* ``loss(task, output, mix, extra)`` — the step's loss from the output rows of the mixed batch
  and those of the extra rows;
* ``score`` — the score the method is meant to be evaluated with (added to ``eval.scores``).

Composability is done once: BackMix / Cutout / Mixup / CutMix act on the images *before* the
forward and hand their :class:`~backmix_vlm.augment.base.MixResult` on; every method's
classification term goes through ``MixResult.loss(logits, criterion)``, so each mixed row keeps
its λ-weighted labels whatever the method's criterion is.  The authors' code each method
follows, and where we differ, is in docs/methods.md.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry

METHODS: Registry[type["TrainingMethod"]] = Registry("training method")


class TrainingMethod:
    """Plain cross-entropy (the task's own loss, label smoothing included): the base every method extends."""

    name = "plain"
    score: str | None = None        # the score the method is meant to be evaluated with (None: eval.scores as given)
    needs_outliers = False          # an auxiliary outlier set (method.outliers) feeds extra_inputs

    def attach(self, model: nn.Module, num_classes: int) -> None:
        """Put the method's own parameters into ``model`` (before the optimizer is built)."""

    def extra_inputs(self, images: Tensor, outliers: Tensor | None = None) -> Tensor | None:
        """Rows appended to the batch ``images`` for the same forward (None: none)."""
        return None

    def loss(self, task: Any, output: Any, mix: Any, extra: Any = None) -> Tensor:
        """The step's loss: ``output`` holds the rows of ``mix.images``, ``extra`` those of :meth:`extra_inputs`."""
        return task.loss(output, mix)


METHODS.add("plain", TrainingMethod)


def build_method(name: str = "plain", options: dict[str, Any] | None = None) -> TrainingMethod:
    """A registered method by name; an unknown option is a ConfigError naming ``method.options``."""
    import inspect

    cls = METHODS.get(name)
    options = dict(options or {})
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ConfigError(f"method.options: {', '.join(unknown)} not accepted by method '{name}'; "
                          f"accepted: {', '.join(accepted) or 'none'}")
    return cls(**options)


def _positive(value: float, key: str) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"method.options.{key}: {value!r} is not accepted; expected a positive number")
    return value


def _non_negative(value: float, key: str) -> float:
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"method.options.{key}: {value!r} is not accepted; expected a number >= 0")
    return value


# ----------------------------------------------------------------------------- LogitNorm
def logitnorm_cross_entropy(logits: Tensor, target: Tensor, temperature: float, *, reduction: str = "mean",
                            label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of ``logits / (||logits||_2 + 1e-7) / temperature`` (Wei et al., ICML 2022, Eq. 5)."""
    norms = logits.norm(p=2, dim=-1, keepdim=True) + 1e-7
    return F.cross_entropy(logits / norms / temperature, target, reduction=reduction, label_smoothing=label_smoothing)


@METHODS.register("logitnorm")
class LogitNorm(TrainingMethod):
    """LogitNorm (Wei et al., ICML 2022): cross-entropy on the L2-normalised logits divided by τ.

    ``temperature`` 0.04: the paper's CIFAR-10 value (also OpenOOD v1.5's); the authors' README
    command uses 0.01 and their ``--temp`` default is 1.  Evaluated with MSP, as in the paper.
    """

    name, score = "logitnorm", "msp"

    def __init__(self, temperature: float = 0.04) -> None:
        self.temperature = _positive(temperature, "temperature")

    def loss(self, task: Any, output: Any, mix: Any, extra: Any = None) -> Tensor:
        smoothing = float(getattr(task, "label_smoothing", 0.0))

        def criterion(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
            return logitnorm_cross_entropy(logits, target, self.temperature, reduction=reduction,
                                           label_smoothing=smoothing)

        return mix.loss(output.logits, criterion)


# ----------------------------------------------------------------------------- Outlier Exposure
def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """Mean cross-entropy from the uniform distribution to softmax(logits): OE's outlier term,
    ``-(logits.mean(1) - logsumexp(logits, 1)).mean()`` (Hendrycks et al., ICLR 2019)."""
    return -(logits.mean(1) - torch.logsumexp(logits, dim=1)).mean()


@METHODS.register("oe")
class OutlierExposure(TrainingMethod):
    """Outlier Exposure (Hendrycks et al., ICLR 2019): CE on the known rows + ``weight`` x the
    cross-entropy to the uniform distribution on a batch of auxiliary outliers, in the same forward
    (the authors concatenate the in- and out-batch, so BatchNorm sees both).

    ``weight`` 0.5 and ``outlier_batch_ratio`` 2 (outlier batch = 2 x the clean batch: 256 vs
    128) are the authors' ``oe_scratch.py``.  The outlier set is ``method.outliers``; any
    evaluation set from the same source is flagged (``jobs.train.outlier_seen_sets``).
    """

    name, score, needs_outliers = "oe", "msp", True

    def __init__(self, weight: float = 0.5, outlier_batch_ratio: float = 2.0) -> None:
        self.weight = _non_negative(weight, "weight")
        self.outlier_batch_ratio = _positive(outlier_batch_ratio, "outlier_batch_ratio")

    def extra_inputs(self, images: Tensor, outliers: Tensor | None = None) -> Tensor | None:
        if outliers is None:
            raise ConfigError("method oe: no outlier batch; set method.outliers to an auxiliary outlier dataset")
        return outliers.to(dtype=images.dtype, memory_format=torch.contiguous_format)

    def loss(self, task: Any, output: Any, mix: Any, extra: Any = None) -> Tensor:
        return task.loss(output, mix) + self.weight * uniform_cross_entropy(extra.logits)


# ----------------------------------------------------------------------------- RotPred
def rotations(images: Tensor) -> Tensor:
    """The batch rotated by 90, 180 and 270 degrees (3B rows, in that order)."""
    return torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in (1, 2, 3)])


@METHODS.register("rotpred")
class RotPred(TrainingMethod):
    """RotPred (Hendrycks et al., NeurIPS 2019, "Using self-supervised learning ..."): a 4-way
    rotation head on the penultimate features; every row of the batch also goes through the
    same forward rotated by 90 / 180 / 270 degrees; loss = CE(classes, unrotated rows) +
    ``weight`` x CE(rotation, all 4B rows).  ``weight`` 1: OpenOOD v1.5's RotPred trainer, and
    the authors' ss-ood run (rot weight 3 inside a ``/ 3`` average of three heads).
    Evaluated with the ``rotpred`` score (KL to uniform minus the mean rotation loss).
    """

    name, score = "rotpred", "rotpred"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = _non_negative(weight, "weight")

    def attach(self, model: nn.Module, num_classes: int) -> None:
        dim = getattr(model, "num_features", None)
        if dim is None:
            raise ConfigError(f"method rotpred: {type(model).__name__} has no num_features for the rotation head")
        model.rotation_head = nn.Linear(int(dim), 4)

    def extra_inputs(self, images: Tensor, outliers: Tensor | None = None) -> Tensor | None:
        return rotations(images)

    def loss(self, task: Any, output: Any, mix: Any, extra: Any = None) -> Tensor:
        head = _unwrap(task.model).rotation_head
        n = output.features.shape[0]
        features = torch.cat([output.features, extra.features])
        target = torch.arange(4, device=features.device).repeat_interleave(n)
        return task.loss(output, mix) + self.weight * F.cross_entropy(head(features), target)


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # type: ignore[assignment]
    return model


# ----------------------------------------------------------------------------- ARPL
def arpl_logits(features: Tensor, points: Tensor) -> Tensor:
    """ARPL's logits: ``||f - p_k||^2 / D - f . p_k`` (Chen et al., TPAMI 2021; their ``Dist`` with one
    reciprocal point per class).  ``features`` (..., D), ``points`` (K, D) -> (..., K)."""
    sq = (features.pow(2).sum(-1, keepdim=True) - 2 * features @ points.t() + points.pow(2).sum(-1)) / features.shape[-1]
    return sq - features @ points.t()


class ARPLHead(nn.Module):
    """The classifier of a CAM model replaced by ARPL's reciprocal points (+ the learned radius).

    Same interface as :class:`~backmix_vlm.models.cnn.CamHead`: ``forward(fmap) -> (logits, cam)``
    where the logits are ARPL's on the pooled features and the CAM is the same function at every
    location of the feature map (BackMix's foreground maps), and ``pool_features``.
    """

    def __init__(self, in_features: int, num_classes: int, pool: str = "avg") -> None:
        super().__init__()
        self.points = nn.Parameter(0.1 * torch.randn(num_classes, in_features))  # the authors' init
        self.radius = nn.Parameter(torch.zeros(1))
        self.pool = pool

    def pool_features(self, fmap: Tensor) -> Tensor:
        return fmap.mean(dim=(2, 3)) if self.pool == "avg" else fmap.amax(dim=(2, 3))

    def forward(self, fmap: Tensor) -> tuple[Tensor, Tensor]:
        points = self.points.to(fmap.dtype)
        cam = arpl_logits(fmap.movedim(1, -1), points).movedim(-1, 1)
        return arpl_logits(self.pool_features(fmap), points), cam


@METHODS.register("arpl")
class ARPL(TrainingMethod):
    """ARPL (Chen et al., TPAMI 2021): reciprocal points replace the classifier; loss =
    CE(logits / ``temperature``) + ``weight_pl`` x max(0, d(f, p_y) - R + 1) with
    d = mean squared distance to the label's point and R a learned radius.  Defaults (0.1, 1.0)
    are the authors' ``osr.py``; their score is the maximum ARPL logit (``maxlogit``).
    The "+CS" confusing-sample GAN is not implemented.
    """

    name, score = "arpl", "maxlogit"

    def __init__(self, weight_pl: float = 0.1, temperature: float = 1.0) -> None:
        self.weight_pl = _non_negative(weight_pl, "weight_pl")
        self.temperature = _positive(temperature, "temperature")

    def attach(self, model: nn.Module, num_classes: int) -> None:
        head = getattr(model, "head", None)
        if head is None or not hasattr(head, "pool_features") or not hasattr(model, "num_features"):
            raise ConfigError(f"method arpl replaces a CAM classifier's head; {type(model).__name__} has none")
        model.head = ARPLHead(int(model.num_features), num_classes, pool=getattr(head, "pool", "avg"))

    def loss(self, task: Any, output: Any, mix: Any, extra: Any = None) -> Tensor:
        head = _unwrap(task.model).head
        smoothing = float(getattr(task, "label_smoothing", 0.0))

        def ce(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
            return F.cross_entropy(logits / self.temperature, target, reduction=reduction, label_smoothing=smoothing)

        def margin(features: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
            d = (features - head.points[target]).pow(2).mean(1)
            return F.margin_ranking_loss(head.radius.expand_as(d), d, torch.ones_like(d), margin=1.0,
                                         reduction=reduction)

        return mix.loss(output.logits, ce) + self.weight_pl * mix.loss(output.features, margin)
