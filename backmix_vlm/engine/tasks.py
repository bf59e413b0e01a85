"""Train tasks: what the :class:`~backmix_vlm.engine.trainer.Trainer` needs per model family.

:class:`ClassifierTask` covers every model that returns a
:class:`~backmix_vlm.models.output.ModelOutput` and trains with (mixed) cross-entropy —
the from-scratch CNNs.  Its BackMix foreground maps come from the CAM head of the SAME
forward pass the loss uses (no extra pass): the pixel-wise softmax of the CAM logits, label
channel kept (:func:`backmix_vlm.saliency.cam.cam_foreground`).

Adapters over a frozen CLIP subclass it: set ``trainable_only = True`` (checkpoints hold
only the adapter) and implement ``saliency_extra_pass`` when their maps need their own pass.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.output import ModelOutput


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

    def forward(self, model: nn.Module, images: Tensor) -> ModelOutput:
        out = model(images)
        return out if isinstance(out, ModelOutput) else ModelOutput(logits=out)

    def loss(self, output: ModelOutput, mix: Any) -> Tensor:
        if self.label_smoothing:
            return mix.loss(output.logits, functools.partial(F.cross_entropy, label_smoothing=self.label_smoothing))
        return mix.loss(output.logits)

    def saliency_from_output(self, output: ModelOutput, images: Tensor, labels: Tensor,
                             grad_scale: float = 1.0) -> Tensor | None:
        if output.cam is None:  # the CAM is a forward quantity: grad_scale does not apply
            return None
        from ..saliency.cam import cam_foreground

        return cam_foreground(output.cam.detach(), labels)

    def saliency_extra_pass(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor | None:
        return None  # the CAM comes with the training forward

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
