"""Train tasks: what the :class:`~backmix_vlm.engine.trainer.Trainer` needs per model family.

A model family plugs into the trainer as a :class:`TrainTask`.  One training step calls it in
this order, and every piece of state that goes from one call to the next travels in the
step's :class:`StepPlan` (the task keeps none between calls)::

    plan = task.plan_step(model, images, labels, update_bank=..., clean_first=...)   # 1. before mixing
    out  = task.forward(model, mixed_batch, plan)                                   # 2. the training forward
    loss = task.loss(out, mix)                                                      # 3. then backward + optimizer step
    maps = task.bank_maps(plan, out[:B], batch[:B], row_labels, grad_scale=...)     # 4. after the step

:class:`ClassifierTask` covers every model that returns a
:class:`~backmix_vlm.models.output.ModelOutput` and trains with (mixed) cross-entropy —
the from-scratch CNNs.  Its BackMix foreground maps come from the CAM head of the SAME
forward pass the loss uses (plan source ``output``, no extra pass): the pixel-wise softmax of
the CAM logits, label channel kept (:func:`backmix_vlm.saliency.cam.cam_foreground`).
Adapters over a frozen CLIP / ViT use :class:`~backmix_vlm.engine.adapter_task.AdapterTask`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.output import ModelOutput

#: where a step's bank maps come from (``StepPlan.source``)
PLAN_SOURCES = (
    "none",     # no maps this step (no bank, or not a bank-update step)
    "output",   # read from the training output after the step (a CNN's CAM)
    "ready",    # computed by plan_step itself, before the forward (a separate pass)
    "record",   # the forward records attention; maps from the training backward (VPT, LoRA)
    "capture",  # the forward keeps block start_layer's input; maps from a tail pass after the step (CoOp)
)
_STAGES = ("planned", "forwarded", "done")


@dataclass
class StepPlan:
    """How one training step gets its mask-bank maps, and what the step's calls hand each other.

    Made by ``task.plan_step`` before the forward; the forward of that step fills what it is
    asked to keep (``recording`` / ``block_input`` / ``text``); ``task.bank_maps`` reads it
    after the optimizer step.  ``stage`` moves ``planned → forwarded → done`` and a call out of
    that order raises (:meth:`advance`), so a plan serves exactly one step.
    """

    source: str = "none"
    images: Tensor | None = None         # the clean batch the maps are for (B rows)
    labels: Tensor | None = None
    maps: Tensor | None = None           # "ready" (or a capture that had to fall back to a separate pass)
    recording: Any = None                # "record": the attention Recording of the training forward
    block_input: Tensor | None = None    # "capture": clean rows' input of block start_layer, (B, T, D), detached
    text: Tensor | None = None           # "capture": the class text features of the training forward, detached
    stage: str = "planned"

    def __post_init__(self) -> None:
        if self.source not in PLAN_SOURCES:
            raise ValueError(f"StepPlan.source: {self.source!r}; expected one of {', '.join(PLAN_SOURCES)}")

    @property
    def wants_maps(self) -> bool:
        return self.source != "none"

    def advance(self, stage: str) -> None:
        """Move to ``stage`` (``forwarded`` or ``done``); only the next stage in order is accepted."""
        expected = _STAGES[_STAGES.index(self.stage) + 1] if self.stage != "done" else None
        if stage != expected:
            what = {"forwarded": "a forward", "done": "bank maps"}.get(stage, stage)
            raise RuntimeError(f"StepPlan ({self.source}): {what} asked while the plan is '{self.stage}'; "
                               f"one plan serves one step: plan_step -> forward -> loss/backward/step -> bank_maps")
        self.stage = stage


@runtime_checkable
class TrainTask(Protocol):
    """What the Trainer needs from one model family; the calls of one step, in order:

    1. ``plan_step(model, images, labels, update_bank=, clean_first=) -> StepPlan`` — before the
       batch is mixed, only when the run has a mask bank.  ``model`` is the *unwrapped* module.
       ``update_bank``: this is a ``backmix.bank_update_every`` step (a task may skip maps that cost
       a pass otherwise); ``clean_first``: the forward's first B rows will be these clean images
       (``alongside``).  A separate pass that uses autograd must not leave gradients in ``.grad``
       (use ``torch.autograd.grad``).
    2. ``forward(model, images, plan=None) -> ModelOutput`` — the training forward of the (mixed)
       batch on the *prepared* module (DDP-wrapped in multi-process runs), under autocast; with a
       plan it keeps what the plan asks for.  ``plan=None``: a plain forward.
    3. ``loss(output, mix) -> Tensor`` — the trainer then runs backward and the optimizer step.
    4. ``bank_maps(plan, output, images, labels, grad_scale=1.0) -> Tensor | None`` — under
       ``no_grad``, after the optimizer step, for the rows that match the clean batch one-to-one;
       ``grad_scale`` is the loss scale the step's backward used (GradScaler with fp16, else 1):
       gradients read from that backward must be divided by it.  Non-finite maps are dropped by
       the trainer (``bank_skipped``).

    ``model`` is the module to train (its frozen parts may be inside it); ``trainable_only``:
    checkpoints hold only parameters with ``requires_grad``; ``saliency_size`` is the (h, w) of
    the maps (the mask bank is built at that size), or None when the task has no saliency.
    """

    model: nn.Module
    trainable_only: bool
    saliency_size: tuple[int, int] | None

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def plan_step(self, model: nn.Module, images: Tensor, labels: Tensor, *, update_bank: bool = True,
                  clean_first: bool = True) -> StepPlan: ...

    def forward(self, model: nn.Module, images: Tensor, plan: StepPlan | None = None) -> ModelOutput: ...

    def loss(self, output: ModelOutput, mix: Any) -> Tensor: ...

    def bank_maps(self, plan: StepPlan, output: ModelOutput, images: Tensor, labels: Tensor,
                  grad_scale: float = 1.0) -> Tensor | None: ...


class ClassifierTask:
    """Cross-entropy on ``MixResult`` labels; CAM maps from the training forward."""

    trainable_only = False

    def __init__(self, model: nn.Module, image_size: int | tuple[int, int], label_smoothing: float = 0.0) -> None:
        if not 0.0 <= float(label_smoothing) < 1.0:
            from ..errors import ConfigError

            raise ConfigError(f"optim.label_smoothing: {label_smoothing!r} is not accepted; expected a number in [0, 1)")
        self.model = model
        self.label_smoothing = float(label_smoothing)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self._saliency_size: tuple[int, int] | None | str = "unset"

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def plan_step(self, model: nn.Module, images: Tensor, labels: Tensor, *, update_bank: bool = True,
                  clean_first: bool = True) -> StepPlan:
        """The CAM comes with every training forward at no cost: maps every step."""
        return StepPlan("output", images, labels)

    def forward(self, model: nn.Module, images: Tensor, plan: StepPlan | None = None) -> ModelOutput:
        if plan is not None:
            plan.advance("forwarded")
        out = model(images)
        return out if isinstance(out, ModelOutput) else ModelOutput(logits=out)

    def loss(self, output: ModelOutput, mix: Any) -> Tensor:
        if self.label_smoothing:
            return mix.loss(output.logits, functools.partial(F.cross_entropy, label_smoothing=self.label_smoothing))
        return mix.loss(output.logits)

    def bank_maps(self, plan: StepPlan, output: ModelOutput, images: Tensor, labels: Tensor,
                  grad_scale: float = 1.0) -> Tensor | None:
        plan.advance("done")
        if plan.source != "output":
            return None
        return self.saliency_from_output(output, images, labels, grad_scale)

    def saliency_from_output(self, output: ModelOutput, images: Tensor, labels: Tensor,
                             grad_scale: float = 1.0) -> Tensor | None:
        """The CAM foreground of an output at ``labels`` (None without a CAM head)."""
        if output.cam is None:  # the CAM is a forward quantity: grad_scale does not apply
            return None
        from ..saliency.cam import cam_foreground

        return cam_foreground(output.cam.detach(), labels)

    @property
    def saliency_size(self) -> tuple[int, int] | None:
        """The CAM resolution: ``model.cam_size`` when the model has it, else probed once with a
        no-grad eval-mode forward of one blank image."""
        if self._saliency_size == "unset" and hasattr(self.model, "cam_size"):
            self._saliency_size = tuple(self.model.cam_size(self.image_size))
        if self._saliency_size == "unset":
            was_training = self.model.training
            param = next(self.model.parameters())
            self.model.eval()
            try:
                with torch.no_grad():
                    out = self.forward(self.model, torch.zeros(1, 3, *self.image_size, device=param.device))
            finally:
                self.model.train(was_training)
            self._saliency_size = None if out.cam is None else tuple(int(s) for s in out.cam.shape[-2:])
        return self._saliency_size  # type: ignore[return-value]
