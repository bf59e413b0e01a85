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

Bank updates happen every ``backmix.bank_update_every`` steps (the trainer asks for them with
``saliency_extra_pass`` before the forward).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_choice
from ..models.output import ModelOutput

SALIENCY_SOURCES = ("attention", "local")


@dataclass
class SaliencyConfig:
    """Where BackMix's foreground maps come from for transformers."""

    source: str = "attention"          # attention (grad x attention relevance) | local (patch-text similarity, CLIP only)
    start_layer: int = -1              # -1: last block only (Chefer's CLIP default; our default, see docs); 0: all blocks
    reuse_backward: bool = True        # VPT: maps from the training backward (no extra pass)
    reuse_forward: bool = True         # CoOp/LoCoOp: reuse the training forward up to start_layer (tail pass only)
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
        # maps from the training backward: VPT, and any adapter that says its gradients reach the image
        # tower (LoRA); it then provides blocks / num_prefix_tokens / view.patch_size like VPT
        self.is_vpt = hasattr(adapter, "forward_tokens") or bool(getattr(adapter, "maps_from_backward", False))
        if self.cfg.source == "local" and not hasattr(adapter, "encode_text"):
            from ..errors import ConfigError

            raise ConfigError("saliency.source: 'local' needs CLIP text features (CoOp / LoCoOp); "
                              "use saliency.source=attention for VPT")
        self._extractor = None
        self._recording = None
        self._capture: _Capture | None = None   # reuse_forward: requested, filled by the next forward
        self._captured: _Capture | None = None  # reuse_forward: filled, read by saliency_from_output

    # ------------------------------------------------------------------ TrainTask
    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    @property
    def saliency_size(self) -> tuple[int, int]:
        patch = self._patch_size()
        return self.image_size // patch[0], self.image_size // patch[1]

    def forward(self, model: nn.Module, images: Tensor) -> ModelOutput:
        capture, self._capture = self._capture, None
        if capture is not None and model.training:
            return self._forward_capturing(model, images, capture)
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

    def saliency_from_output(self, output: ModelOutput, images: Tensor, labels: Tensor,
                             grad_scale: float = 1.0) -> Tensor | None:
        captured, self._captured = self._captured, None
        if captured is not None:  # own autograd.grad of unscaled logits: grad_scale does not apply
            return captured.maps if captured.maps is not None else self._tail_maps(captured)
        rec, self._recording = self._recording, None
        if rec is None:
            return None
        maps = rec.maps(from_loss=True, grad_scale=grad_scale)  # gradients of the (scaled) training loss
        return maps[: images.shape[0]].detach()

    def saliency_extra_pass(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor | None:
        if self._reuse_backward():  # maps come from this step's training backward
            self._record_labels = labels
            return None
        if self._reuse_forward():  # maps come from this step's training forward + a tail pass
            self._capture = _Capture(images, labels)
            return None
        return self._separate_pass(model, images, labels)

    # ------------------------------------------------------------------ CoOp / LoCoOp maps
    def _separate_pass(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """Maps from their own pass on the clean images (or CLIP's patch-text similarity)."""
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

    def _forward_capturing(self, model: nn.Module, images: Tensor, cap: "_Capture") -> ModelOutput:
        """The training forward, keeping the clean rows' input of block ``start`` and the text features."""
        b = cap.labels.shape[0]
        if images.shape[0] < b or not torch.equal(images[:b], cap.images):
            # the clean images are not in this batch (mixed_only): separate pass, before the optimizer step
            cap.maps = self._separate_pass(self.model, cap.images, cap.labels)
            self._captured = cap
            return model(images)
        transformer = self.model.base.visual.transformer
        seq_first = not transformer.batch_first

        def grab(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if cap.x is None:  # first call only
                x = args[0].detach()
                cap.x = x[:, :b].transpose(0, 1) if seq_first else x[:b]  # clean rows, (B, T, D)

        handle = transformer.resblocks[self.extractor().start].register_forward_pre_hook(grab)
        try:
            with _keep_text_features(self.model, cap):
                out = model(images)
        finally:
            handle.remove()
        if cap.x is None:
            raise RuntimeError("saliency.reuse_forward: the image tower's block "
                               f"{self.extractor().start} did not run in the training forward")
        self._captured = cap
        return out

    def _tail_maps(self, cap: "_Capture") -> Tensor:
        """Relevance of blocks ``start..L-1`` from the captured block input: the tail pass only."""
        model = self.model
        text = cap.text
        if text is None:  # the adapter's forward did not go through encode_text
            with torch.no_grad():
                text = model.encode_text()
        was_training = model.training
        model.eval()
        try:  # the trainer calls saliency_from_output under no_grad; the relevance needs a graph
            with torch.enable_grad(), self._autocast():
                maps = self.extractor()(cap.x, cap.labels, self._tail_logits_fn(text))
        finally:
            model.train(was_training)
        return maps.float().detach()

    def _tail_logits_fn(self, text_features: Tensor) -> Callable[[Tensor], Tensor]:
        """``x_start (B, T, D) -> logit_scale · cos(image, text)``: what ``clip_logits_fn`` computes
        after block ``start`` (open_clip ``VisionTransformer.forward`` from the transformer on)."""
        base = self.model.base
        visual = base.visual
        transformer = visual.transformer
        blocks = list(transformer.resblocks)[self.extractor().start:]
        seq_first = not transformer.batch_first
        text = F.normalize(text_features.detach(), dim=-1)

        def tail(x: Tensor) -> Tensor:
            if seq_first:
                x = x.transpose(0, 1)  # NLD -> LND
            for block in blocks:
                x = block(x)
            if seq_first:
                x = x.transpose(0, 1)
            pooled, _ = visual._pool(x)
            if visual.proj is not None:
                pooled = pooled @ visual.proj
            image = F.normalize(pooled, dim=-1)
            return base.logit_scale.detach().exp() * image @ text.to(image.dtype).t()

        return tail

    # ------------------------------------------------------------------ helpers
    _record_labels: Tensor | None = None

    def _reuse_backward(self) -> bool:
        return self.is_vpt and self.cfg.source == "attention" and self.cfg.reuse_backward

    def _reuse_forward(self) -> bool:
        return not self.is_vpt and self.cfg.source == "attention" and self.cfg.reuse_forward

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
        """Autocast for the map passes in the run's precision (``backmix_vlm.runtime``): a frozen tower
        held in fp16 (``backbone.frozen_weights``) needs fp16 autocast to run at all; its relevance
        gradients are unscaled, so a map that under- or overflows is refused by the bank."""
        from ..runtime import autocast

        device = next(self.model.parameters()).device
        return autocast(device, self.precision)


@dataclass
class _Capture:
    """One reuse-forward bank update: the clean batch, then what the training forward left."""

    images: Tensor
    labels: Tensor
    x: Tensor | None = None       # clean rows' input of block start_layer, (B, T, D), detached
    text: Tensor | None = None    # the text features of the training forward, detached
    maps: Tensor | None = None    # set when the separate pass had to run instead (mixed_only)


@contextmanager
def _keep_text_features(adapter: nn.Module, cap: _Capture) -> Iterator[None]:
    """Let the adapter's own ``encode_text`` call store its (detached) result in ``cap.text``.

    The training forward computes the class text features anyway; keeping them saves a text-tower
    forward per bank update (with 1000 classes that costs more than the image tail).
    """
    original = adapter.encode_text
    saved = adapter.__dict__.get("encode_text")

    def encode_text(*args: Any, **kwargs: Any) -> Tensor:
        out = original(*args, **kwargs)
        if cap.text is None:
            cap.text = out.detach()
        return out

    adapter.encode_text = encode_text  # type: ignore[method-assign]
    try:
        yield
    finally:
        if saved is None:
            del adapter.encode_text
        else:
            adapter.encode_text = saved  # type: ignore[method-assign]
