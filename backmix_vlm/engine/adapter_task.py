"""Train task for prompt adapters over a frozen CLIP / ViT (CoOp, LoCoOp, VPT).

What differs from the CNN path (:class:`~backmix_vlm.engine.tasks.ClassifierTask`) is where
BackMix's foreground maps come from — transformers have no CAM head, so the maps are
gradient-weighted attention relevance (:mod:`backmix_vlm.saliency.relevance`) or, without
gradients, CLIP's patch-to-text similarity (:mod:`backmix_vlm.saliency.local`):

* **VPT** back-propagates through the image tower anyway, so the maps are taken from the
  *training* backward: the clean rows' attention is recorded during the training forward and
  read after ``loss.backward()`` (no extra pass).  ``saliency.exact_target_grads`` switches to
  Chefer's one-hot target-logit gradient at the cost of one partial backward through the
  blocks the relevance needs.
* **CoOp / LoCoOp** never send gradients into the image tower.  With ``saliency.reuse_forward``
  (default) the training forward of the 2B batch is reused: a forward pre-hook keeps the clean
  rows' input of block ``start_layer`` and the text features the step used, and after the step
  only the *tail* runs again — blocks ``start_layer..L-1`` with explicit attention, CLIP's
  pooling / projection and the cosine to the text — followed by a backward through that tail.
  With the default ``start_layer=-1`` that is one block of B images forward + backward instead
  of a whole extra image-tower forward.  ``reuse_forward=False`` runs the separate pass on the
  clean images (a forward whose blocks below ``start_layer`` run without a graph, and a
  backward through the last blocks only); both give the same maps up to float rounding (the
  blocks below ``start_layer`` run fused attention in training, explicit attention in the
  separate pass).  When the forward does not contain the clean images (``backmix.mode:
  mixed_only``) the separate pass runs instead, before the optimizer step, on the *clean*
  images (their frozen image tower gets no gradient from the mixed batch; see docs/methods.md).
* Under fp16 with a GradScaler the trainer passes the step's loss scale to
  ``saliency_from_output``; VPT's training-backward maps divide the gradients by it.

Bank updates happen every ``backmix.bank_update_every`` steps.  Which of these paths a step
takes is decided by :meth:`AdapterTask.plan_step` and carried by the step's
:class:`~backmix_vlm.engine.tasks.StepPlan` (``record`` / ``capture`` / ``ready``); the task keeps
no state between the calls of a step.  Everything model-specific comes from the adapter
(``maps_from_backward``, ``image_blocks``, ``num_prefix_tokens``, ``patch_size``,
``map_logits_fn``, ``tail_logits_fn``, ``keep_text_features``; see
:mod:`backmix_vlm.adapters.base`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.output import ModelOutput
from ..saliency.relevance import DEFAULT_START_LAYER
from ..validation import check_choice
from .tasks import StepPlan

SALIENCY_SOURCES = ("attention", "local")


@dataclass
class SaliencyConfig:
    """Where BackMix's foreground maps come from for transformers."""

    source: str = "attention"          # attention (grad x attention relevance) | local (patch-text similarity, CLIP only)
    start_layer: int = DEFAULT_START_LAYER  # -1: last block only (Chefer's CLIP default; see docs); 0: all blocks
    reuse_backward: bool = True        # VPT: maps from the training backward (no extra pass)
    reuse_forward: bool = True         # CoOp/LoCoOp: reuse the training forward up to start_layer (tail pass only)
    exact_target_grads: bool = False   # VPT + reuse_backward: Chefer's target-logit gradient (one partial backward)
    local_mode: str = "softmax"        # local source: softmax over classes per patch at the label | cosine

    def validate(self) -> None:
        check_choice(self.source, SALIENCY_SOURCES, "saliency.source")


class AdapterTask:
    """:class:`~backmix_vlm.engine.tasks.TrainTask` for an :class:`~backmix_vlm.adapters.base.Adapter`."""

    trainable_only = True   # checkpoints hold the adapter's parameters, not the frozen backbone

    def __init__(self, adapter: nn.Module, image_size: int, saliency: SaliencyConfig | None = None,
                 precision: str = "no") -> None:
        self.model = adapter
        self.image_size = int(image_size)
        self.cfg = saliency or SaliencyConfig()
        self.precision = precision
        self.method = type(adapter).__name__.lower()
        # maps from the training backward when the adapter says its gradients reach the image tower
        self.from_backward = bool(adapter.maps_from_backward)
        if self.cfg.source == "local" and not adapter.encodes_text:
            raise ConfigError("saliency.source: 'local' needs CLIP text features (CoOp / LoCoOp); "
                              "use saliency.source=attention for VPT")
        self._extractor = None  # built once (a view of the adapter's blocks; no per-step state)

    # ------------------------------------------------------------------ TrainTask
    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    @property
    def saliency_size(self) -> tuple[int, int]:
        patch = self.model.patch_size
        return self.image_size // patch[0], self.image_size // patch[1]

    def plan_step(self, model: nn.Module, images: Tensor, labels: Tensor, *, update_bank: bool = True,
                  clean_first: bool = True) -> StepPlan:
        """``record`` (maps from this step's training backward), ``capture`` (from its forward + a tail
        pass), ``ready`` (a separate pass, run now) or ``none`` (not a bank-update step)."""
        if not update_bank:
            return StepPlan("none")
        if self._reuse_backward():
            return StepPlan("record", images, labels)
        if self._reuse_forward() and clean_first:
            return StepPlan("capture", images, labels)
        # the separate pass; also when the forward will not hold the clean images (backmix.mode:
        # mixed_only): on the clean images, before the optimizer step (docs/methods.md)
        return StepPlan("ready", images, labels, maps=self._separate_pass(model, images, labels))

    def forward(self, model: nn.Module, images: Tensor, plan: StepPlan | None = None) -> ModelOutput:
        if plan is not None:
            plan.advance("forwarded")
        if plan is None or not model.training:
            return model(images)
        if plan.source == "capture":
            return self._forward_capturing(model, images, plan)
        if plan.source != "record":
            return model(images)
        with self.extractor().record() as rec:  # records the first forward: the whole 2B batch
            out = model(images)
        plan.recording = rec
        if self.cfg.exact_target_grads:
            # gradient of each clean image's own label logit (rows [:B] are the originals)
            rec.target_grads(out.logits[: plan.labels.shape[0]].float(), plan.labels)
        return out

    def loss(self, output: ModelOutput, mix: Any) -> Tensor:
        """The adapter's objective on (possibly label-mixed) targets.

        One label per row: ``adapter.loss``.  Mixed labels with one λ (Mixup / CutMix):
        ``λ·loss(a) + (1-λ)·loss(b)``, regulariser included.  Per-row λ (alongside + Mixup /
        CutMix): per-row cross-entropy weighted by λ, plus the adapter's regulariser (LoCoOp's
        background entropy) as ``w·R(a) + (1-w)·R(b)`` with ``w = mean(λ)`` — for a constant λ
        this equals the one-λ formula, so the regulariser is never dropped.
        """
        adapter = self.model
        if mix.labels_b is None:
            return adapter.loss(output, mix.labels_a)
        lam = mix.lam
        if isinstance(lam, Tensor):  # per-sample weights (alongside + mixup/cutmix): weight per row
            loss = mix.loss(output.logits)
            regularizer = getattr(adapter, "regularizer", None)
            reg_a = regularizer(output, mix.labels_a) if regularizer is not None else None
            if reg_a is None:
                return loss
            w = lam.float().mean().to(loss.dtype)
            return loss + w * reg_a + (1 - w) * regularizer(output, mix.labels_b)
        return lam * adapter.loss(output, mix.labels_a) + (1 - lam) * adapter.loss(output, mix.labels_b)

    def bank_maps(self, plan: StepPlan, output: ModelOutput, images: Tensor, labels: Tensor,
                  grad_scale: float = 1.0) -> Tensor | None:
        plan.advance("done")
        if plan.maps is not None:  # ready (or a capture that fell back to the separate pass)
            return plan.maps
        if plan.source == "capture" and plan.block_input is not None:
            return self._tail_maps(plan)  # own autograd.grad of unscaled logits: grad_scale does not apply
        if plan.source == "record" and plan.recording is not None:
            maps = plan.recording.maps(from_loss=True, grad_scale=grad_scale)  # gradients of the (scaled) loss
            return maps[: images.shape[0]].detach()
        return None

    # ------------------------------------------------------------------ CoOp / LoCoOp maps
    def _separate_pass(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """Maps from their own pass on the clean images (or CLIP's patch-text similarity)."""
        was_training = model.training
        model.eval()  # dropout-free maps; the frozen base is in eval mode anyway
        try:
            with self._autocast():
                if self.cfg.source == "local":
                    from ..models.clip import encode_image_global_local
                    from ..saliency.local import LocalSimilarity

                    with torch.no_grad():
                        text = model.encode_text()
                    maps = LocalSimilarity(model.base, text, mode=self.cfg.local_mode, grid=self.saliency_size,
                                           encode=encode_image_global_local)(images, labels)
                else:
                    maps = self.extractor()(images, labels, model.map_logits_fn())
        finally:
            model.train(was_training)
        return maps.float().detach()

    def _forward_capturing(self, model: nn.Module, images: Tensor, plan: StepPlan) -> ModelOutput:
        """The training forward, keeping the clean rows' input of block ``start`` and the text features."""
        adapter = self.model
        b = plan.labels.shape[0]
        if images.shape[0] < b or not torch.equal(images[:b], plan.images):
            # the clean images are not the first rows of this batch: separate pass, before the optimizer step
            plan.maps = self._separate_pass(adapter, plan.images, plan.labels)
            return model(images)
        to_batch_first = adapter.vision.to_batch_first

        def grab(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if plan.block_input is None:  # first call only
                plan.block_input = to_batch_first(args[0].detach())[:b]  # clean rows, (B, T, D)

        start = self.extractor().start
        handle = adapter.image_blocks[start].register_forward_pre_hook(grab)
        try:
            with adapter.keep_text_features() as texts:
                out = model(images)
        finally:
            handle.remove()
        if plan.block_input is None:
            raise RuntimeError(f"saliency.reuse_forward: the image tower's block {start} did not run in the "
                               "training forward")
        plan.text = texts[0] if texts else None
        return out

    def _tail_maps(self, plan: StepPlan) -> Tensor:
        """Relevance of blocks ``start..L-1`` from the captured block input: the tail pass only."""
        model = self.model
        text = plan.text
        if text is None:  # the adapter's forward did not report its text features
            with torch.no_grad():
                text = model.encode_text()
        was_training = model.training
        model.eval()
        try:  # the trainer asks for maps under no_grad; the relevance needs a graph
            extractor = self.extractor()
            with torch.enable_grad(), self._autocast():
                maps = extractor(plan.block_input, plan.labels, model.tail_logits_fn(extractor.start, text))
        finally:
            model.train(was_training)
        return maps.float().detach()

    # ------------------------------------------------------------------ helpers
    def _reuse_backward(self) -> bool:
        return self.from_backward and self.cfg.source == "attention" and self.cfg.reuse_backward

    def _reuse_forward(self) -> bool:
        return not self.from_backward and self.cfg.source == "attention" and self.cfg.reuse_forward

    def extractor(self):
        if self._extractor is None:
            from ..saliency.relevance import AttentionRelevance

            m = self.model
            self._extractor = AttentionRelevance(m.image_blocks, start_layer=self.cfg.start_layer,
                                                 num_prefix_tokens=m.num_prefix_tokens, grid=self.saliency_size)
        return self._extractor

    def _autocast(self):
        """Autocast for the map passes in the run's precision (``backmix_vlm.runtime``): a frozen tower
        held in fp16 (``backbone.frozen_weights``) needs fp16 autocast to run at all; its relevance
        gradients are unscaled, so a map that under- or overflows is refused by the bank."""
        from ..runtime import autocast

        device = next(self.model.parameters()).device
        return autocast(device, self.precision)
