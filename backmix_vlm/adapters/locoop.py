"""LoCoOp: CoOp + OOD regularisation from local features (Miyai et al., NeurIPS 2023).

Every patch of a training image gets class logits ``logit_scale * cos(local, text)``.  A patch
whose top-K predicted classes do not include the image's label is treated as background
(an "OOD" region), and its class distribution is pushed towards uniform:

    loss = CE(global logits, y) + lambda_ * (-H(softmax(local logits)))  averaged over those patches

This matches ``entropy_select_topk`` in AtsuMiyai/LoCoOp (trainers/locoop.py): patches of the
whole batch are flattened, the entropy is averaged over the selected patches (not per image),
and the term is 0 when no patch is selected.  One deliberate difference: the entropy uses
``log_softmax`` (exact) instead of ``log(p + 1e-5)``, which shifts values by < 1e-4 nats.

Top-K: LoCoOp uses K = 200 for ImageNet's 1000 classes, i.e. a patch counts as background
unless its label is among its top 20 % of classes.  ``top_k=None`` keeps that fraction:
``K = round(0.2 * num_classes)`` clamped to ``[1, num_classes - 1]`` — K = 2 for CIFAR-10.
(A fixed K such as 5 of 10 would select far fewer patches than the paper's setting.)

**SCT** (Yu et al., NeurIPS 2024, "Self-Calibrated Tuning"): ``sct: true`` weights both terms
per sample by the true-class probability ``p_i = softmax(global logits_i)[y_i]``:

    loss = mean_i (1 - p_i) CE_i + lambda_ * (-mean over selected patches of p_{image(patch)} H(patch))

as tmlr-group/SCT (trainers/sct.py): confident samples lean on the OOD regulariser, uncertain
ones on classification; the weights are not detached there (gradients flow through ``p``),
``sct_detach: true`` treats them as constants.  The official code's 1e-7 offsets on the weights
and ``log(p + 1e-5)`` are not copied (differences < 1e-4).

Scores: MCM reads ``ModelOutput.cosine``, GL-MCM also ``local_cosine`` (always computed here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.output import ModelOutput
from .base import ADAPTERS
from .coop import CoOp, CoOpConfig

TOP_K_FRACTION = 0.2  # LoCoOp: top_k = 200 of 1000 ImageNet classes


@dataclass
class LoCoOpConfig(CoOpConfig):
    top_k: int | None = None           # None: round(0.2 * num_classes), LoCoOp's 200/1000
    lambda_: float = 0.25              # weight of the entropy regulariser (LoCoOp default)
    local_features: bool = True        # LoCoOp needs local features; at eval they feed GL-MCM
    sct: bool = False                  # SCT: weight CE by (1 - p_y) and the regulariser by p_y per sample
    sct_detach: bool = False           # SCT weights as constants (official code: gradients flow through them)

    def validate(self) -> None:
        super().validate()
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"adapter.top_k: {self.top_k} is not accepted; must be >= 1 (or null for 20% of classes)")
        if self.lambda_ < 0:
            raise ConfigError(f"adapter.lambda_: {self.lambda_} is not accepted; must be >= 0")


def resolve_top_k(top_k: int | None, num_classes: int) -> int:
    """The K in "label not among the patch's top-K classes"; must leave at least one class out."""
    if num_classes < 2:
        raise ConfigError(f"LoCoOp needs at least 2 classes, got {num_classes}")
    if top_k is None:
        return min(max(1, round(TOP_K_FRACTION * num_classes)), num_classes - 1)
    if not 1 <= top_k < num_classes:
        raise ConfigError(f"adapter.top_k: {top_k} is not accepted with {num_classes} classes; "
                          f"choose 1..{num_classes - 1} (null = {TOP_K_FRACTION:.0%} of the classes)")
    return top_k


def locoop_regularizer(local_logits: torch.Tensor, labels: torch.Tensor, top_k: int,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """``-mean entropy`` of the patches whose top-K classes miss the label (0 if there are none).

    ``local_logits``: ``(B, P, K)``; ``labels``: ``(B,)``.  Minimising this maximises the
    entropy of background patches.  ``weights`` ``(B,)`` (SCT) multiplies each selected
    patch's entropy by its image's weight before the mean.
    """
    b, p, k = local_logits.shape
    flat = local_logits.reshape(b * p, k)
    patch_labels = labels.repeat_interleave(p)
    topk = flat.topk(top_k, dim=1).indices
    background = ~(topk == patch_labels.unsqueeze(1)).any(dim=1)
    if not bool(background.any()):
        return flat.sum() * 0.0  # keeps the graph (DDP needs every parameter to get a gradient)
    selected = flat[background]
    if selected.dtype in (torch.float16, torch.bfloat16):
        selected = selected.float()  # entropy in full precision under autocast
    logp = F.log_softmax(selected, dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1)
    if weights is not None:
        entropy = entropy * weights.to(entropy.dtype).repeat_interleave(p)[background]
    return -entropy.mean()


class LoCoOp(CoOp):
    """CoOp with LoCoOp's local OOD regularisation (only ``ctx`` trains)."""

    config_class = LoCoOpConfig

    def __init__(self, base: Any, classnames: Sequence[str], cfg: LoCoOpConfig | None = None, *,
                 tokenizer: Callable[..., torch.Tensor] | None = None) -> None:
        super().__init__(base, classnames, cfg, tokenizer=tokenizer)
        self.top_k = resolve_top_k(self.cfg.top_k, self.num_classes)
        self.lambda_ = self.cfg.lambda_

    def forward(self, images: torch.Tensor, local: bool | None = None) -> ModelOutput:
        """Like CoOp; local features are always computed in training (the loss needs them)."""
        return super().forward(images, local=True if self.training else local)

    def loss(self, output: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
        if output.local_logits is None:
            raise ValueError("LoCoOp.loss needs output.local_logits: call forward in train mode or with local=True")
        if not self.cfg.sct:
            ce = F.cross_entropy(output.logits, labels)
            return ce + self.regularizer(output, labels).to(ce.dtype)
        return sct_loss(output.logits, output.local_logits, labels, self.top_k, self.lambda_,
                        detach=self.cfg.sct_detach)

    def regularizer(self, output: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
        """``lambda_ * locoop_regularizer(local logits, labels)``: the OOD term of :meth:`loss`
        (with ``sct``: each sample weighted by its true-class probability, as in :func:`sct_loss`)."""
        if output.local_logits is None:
            raise ValueError("LoCoOp.loss needs output.local_logits: call forward in train mode or with local=True")
        weights = None
        if self.cfg.sct:
            weights = F.softmax(output.logits.float(), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
            weights = weights.detach() if self.cfg.sct_detach else weights
        return self.lambda_ * locoop_regularizer(output.local_logits, labels, self.top_k, weights=weights)


def sct_loss(logits: torch.Tensor, local_logits: torch.Tensor, labels: torch.Tensor, top_k: int, lambda_: float,
             *, detach: bool = False) -> torch.Tensor:
    """SCT: ``mean((1 - p_y) CE) + lambda_ * locoop_regularizer(weights = p_y)`` (see the module doc)."""
    logp = F.log_softmax(logits.float(), dim=1)
    nll = -logp.gather(1, labels.unsqueeze(1)).squeeze(1)
    p_true = nll.neg().exp()
    if detach:
        p_true = p_true.detach()
    loss_id = ((1 - p_true) * nll).mean()
    return loss_id + lambda_ * locoop_regularizer(local_logits, labels, top_k, weights=p_true).to(loss_id.dtype)


ADAPTERS.add("locoop", LoCoOp)
