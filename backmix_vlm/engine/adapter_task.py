"""Train task for prompt adapters over a frozen CLIP / ViT (CoOp, LoCoOp, VPT).

What differs from the CNN path (:class:`~backmix_vlm.engine.tasks.ClassifierTask`) is where
BackMix's foreground maps come from — transformers have no CAM head, so the maps are
gradient-weighted attention relevance (:mod:`backmix_vlm.saliency.attention`) or, without
gradients, CLIP's patch-to-text similarity (:mod:`backmix_vlm.saliency.local`):

* **VPT** back-propagates through the image tower anyway, so the maps are taken from the
  *training* backward: the clean rows' attention is recorded during the training forward and
  read after ``loss.backward()`` (no extra pass).  ``saliency.exact_target_grads`` switches to
  Chefer's one-hot target-logit gradient at the cost of one partial backward through the
  blocks the relevance needs.
* **CoOp / LoCoOp** never send gradients into the image tower, so the maps need their own pass
  on the clean images (every ``backmix.bank_update_every`` steps): a forward whose blocks below
  ``start_layer`` run without a graph, and a backward through the last blocks only.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import check_choice
from ..models.output import ModelOutput

SALIENCY_SOURCES = ("attention", "local")


@dataclass
class SaliencyConfig:
    """Where BackMix's foreground maps come from for transformers."""

    source: str = "attention"          # attention (grad x attention relevance) | local (patch-text similarity, CLIP only)
    start_layer: int = -1              # -1: last block only (Chefer's CLIP default; our default, see docs); 0: all blocks
    reuse_backward: bool = True        # VPT: maps from the training backward (no extra pass)
    exact_target_grads: bool = False   # VPT + reuse_backward: Chefer's target-logit gradient (one partial backward)
    local_mode: str = "softmax"        # local source: softmax over classes per patch at the label | cosine

    def validate(self) -> None:
        check_choice(self.source, SALIENCY_SOURCES, "saliency.source")


class AdapterTask:
    """:class:`~backmix_vlm.engine.trainer.TrainTask` for an :class:`~backmix_vlm.adapters.base.Adapter`."""

    trainable_only = True   # checkpoints hold the adapter's parameters, not the frozen backbone

    def __init__(self, adapter: nn.Module, image_size: int, saliency: SaliencyConfig | None = None,
                 precision: str = "no") -> None:
        self.model = adapter
        self.image_size = int(image_size)
        self.cfg = saliency or SaliencyConfig()
        self.precision = precision
        self.method = type(adapter).__name__.lower()
        self.is_vpt = hasattr(adapter, "forward_tokens")
        if self.cfg.source == "local" and not hasattr(adapter, "encode_text"):
            from ..errors import ConfigError

            raise ConfigError("saliency.source: 'local' needs CLIP text features (CoOp / LoCoOp); "
                              "use saliency.source=attention for VPT")
        self._extractor = None
        self._recording = None

    # ------------------------------------------------------------------ TrainTask
    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    @property
    def saliency_size(self) -> tuple[int, int]:
        patch = self._patch_size()
        return self.image_size // patch[0], self.image_size // patch[1]

    def forward(self, model: nn.Module, images: Tensor) -> ModelOutput:
        labels, self._record_labels = self._record_labels, None
        if labels is None or not model.training:
            return model(images)
        with self.extractor().record() as rec:  # records the first forward: the whole 2B batch
            out = model(images)
        self._recording = rec
        if self.cfg.exact_target_grads:
            # gradient of each clean image's own label logit (rows [:B] are the originals)
            rec.target_grads(out.logits[: labels.shape[0]].float(), labels)
        return out

    def loss(self, output: ModelOutput, mix: Any) -> Tensor:
        adapter = self.model
        if mix.labels_b is None:
            return adapter.loss(output, mix.labels_a)
        lam = mix.lam
        if isinstance(lam, Tensor):  # per-sample weights (alongside + mixup/cutmix): weight per row
            return mix.loss(output.logits)
        return lam * adapter.loss(output, mix.labels_a) + (1 - lam) * adapter.loss(output, mix.labels_b)

    def saliency_from_output(self, output: ModelOutput, images: Tensor, labels: Tensor) -> Tensor | None:
        rec, self._recording = self._recording, None
        if rec is None:
            return None
        maps = rec.maps(from_loss=True)
        return maps[: images.shape[0]].detach()

    def saliency_extra_pass(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor | None:
        if self._reuse_backward():  # maps come from this step's training backward
            self._record_labels = labels
            return None
        was_training = model.training
        model.eval()  # dropout-free maps; the frozen base is in eval mode anyway
        try:
            with self._autocast():
                if self.cfg.source == "local":
                    from ..saliency.local import LocalSimilarity

                    with torch.no_grad():
                        text = model.encode_text()
                    maps = LocalSimilarity(model.base, text, mode=self.cfg.local_mode,
                                           grid=self.saliency_size)(images, labels)
                else:
                    maps = self.extractor()(images, labels, self._logits_fn(model))
        finally:
            model.train(was_training)
        return maps.float().detach()

    # ------------------------------------------------------------------ helpers
    _record_labels: Tensor | None = None

    def _reuse_backward(self) -> bool:
        return self.is_vpt and self.cfg.source == "attention" and self.cfg.reuse_backward

    def _patch_size(self) -> tuple[int, int]:
        m = self.model
        if self.is_vpt:
            return tuple(m.view.patch_size)
        visual = m.base.visual
        ps = visual.patch_size
        return (ps, ps) if isinstance(ps, int) else tuple(ps)

    def extractor(self):
        if self._extractor is None:
            from ..saliency.attention import AttentionRelevance

            m = self.model
            blocks = m.blocks if self.is_vpt else m.base.visual.transformer.resblocks
            prefix = m.num_prefix_tokens if self.is_vpt else 1
            self._extractor = AttentionRelevance(list(blocks), start_layer=self.cfg.start_layer,
                                                 num_prefix_tokens=prefix, grid=self.saliency_size)
        return self._extractor

    def _logits_fn(self, model: nn.Module):
        if self.is_vpt:
            return lambda x: model(x).logits
        from ..saliency.attention import clip_logits_fn

        with torch.no_grad():
            text = model.encode_text()
        return clip_logits_fn(model.base, text)

    def _autocast(self):
        if self.precision == "bf16":
            device = next(self.model.parameters()).device.type
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return nullcontext()
