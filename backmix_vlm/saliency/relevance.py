"""Gradient-weighted attention relevance maps for vision transformers.

BackMix needs a soft foreground map per training image.  CNNs get it from a Conv1x1-GAP CAM
(:mod:`backmix_vlm.saliency.cam`); transformers have no spatial class map, so — like the
paper's supplement ("backpropagating class-specific gradients through the attention layers
... accumulating and normalizing these contributions") — we use the relevance rule of Chefer
et al. 2021 ("Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", and their CLIP notebook):

    R = I (T x T);   for every block b >= start_layer:
        Ā_b = mean_heads( (∇A_b ⊙ A_b)⁺ )       # clamp at 0 *before* the head mean
        R   ← R + Ā_b · R
    map = R[CLS, prefix:]  reshaped to the patch grid, min-max normalised per image.

``∇A_b`` is the gradient of the target-class logit (a CLIP cosine·scale or a linear-head logit)
w.r.t. the post-softmax attention of block ``b``.

The attention ``A`` comes from :func:`~backmix_vlm.saliency.explicit.explicit_attention`
(explicit-softmax forwards of only the blocks the relevance reads, ``start_layer`` on);
gradients are taken with :func:`torch.autograd.grad` w.r.t. the attention tensors only (no
``.grad`` on parameters).  Where the blocks / prefix tokens / grid are: :mod:`.layout`.

Two ways to get maps:

* :class:`AttentionRelevance` ``(images, targets, logits_fn)`` — a separate pass (CoOp/LoCoOp,
  whose training never back-propagates into the image tower; the engine calls it every
  ``bank_update_every`` steps).  Blocks below ``start_layer`` run under ``no_grad`` and the
  attention of block ``start_layer`` becomes a graph leaf, so the backward only runs through
  the blocks the relevance needs (with the default ``start_layer=-1``: the head and the last
  block).
* :meth:`AttentionRelevance.record` — reuse a training forward/backward that already goes
  through the image tower (VPT).  The attention tensors are kept with ``retain_grad`` and
  after ``loss.backward()`` :meth:`Recording.maps` costs no extra forward or backward.  Note
  the gradient is then that of the *training loss*, not of the target logit: for CE,
  ``-∂loss/∂θ = (1 - p_y) ∇logit_y - Σ_{k≠y} p_k ∇logit_k`` (and ``∂loss/∂A`` has the opposite
  sign of the "evidence for y" direction, so ``maps`` negates it), plus the batch-mean's 1/B.
  For Chefer's one-hot target-logit gradient call :meth:`Recording.target_grads` *before*
  ``loss.backward()``: one extra partial backward through the blocks >= ``start_layer`` only.

Default ``start_layer``: see ``DEFAULT_START_LAYER`` and docs/benchmarks_saliency.md.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from .explicit import check_supported, explicit_attention
from .layout import model_grid, model_prefix_tokens, resolve_blocks

# Chosen by the mask-quality comparison in docs/benchmarks_saliency.md (scripts/compare_saliency.py,
# real pretrained ViT-S/14 on CIFAR-10): accumulating all layers was not measurably better (centre
# prior +0.002 ± 0.008, deletion drop +0.021 ± 0.013) but cost ~2x the CPU time and, in recording
# mode, keeps L attention tensors alive instead of one.  Last layer only = Chefer's CLIP default.
DEFAULT_START_LAYER = -1


# ----------------------------------------------------------------------------- relevance rule
def relevance_from_attentions(
    attns: Sequence[Tensor | None], grads: Sequence[Tensor | None], start_layer: int = DEFAULT_START_LAYER
) -> Tensor:
    """Chefer's relevance recursion over blocks ``start_layer..L-1``.

    ``attns[b]`` / ``grads[b]``: (B, H, T, T) post-softmax attention of block ``b`` and the
    gradient of the target w.r.t. it; entries below ``start_layer`` are ignored (may be None).
    Returns R (B, T, T) in float32; row 0 is the CLS token's relevance over all tokens.
    """
    num_layers = len(attns)
    if len(grads) != num_layers:
        raise ValueError(f"got {num_layers} attention maps but {len(grads)} gradients")
    start = _resolve_start(start_layer, num_layers)
    first = attns[start]
    if first is None:
        raise ValueError(f"no attention recorded for block {start}")
    batch, _, tokens, _ = first.shape
    rel = torch.eye(tokens, device=first.device, dtype=torch.float32).expand(batch, tokens, tokens)
    for b in range(start, num_layers):
        attn, grad = attns[b], grads[b]
        if attn is None or grad is None:
            raise ValueError(f"block {b}: attention or its gradient is missing (needed from start_layer={start})")
        cam = (grad.float() * attn.detach().float()).clamp(min=0).mean(dim=1)
        rel = rel + torch.bmm(cam, rel)
    return rel


def minmax_normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max each map of (B, ...) to [0, 1] in float32.

    A constant map (e.g. all zero when no attention had positive gradient·attention) carries
    no ranking, so it becomes all zeros: an EMA bank update with zeros keeps the bank's
    previous ordering (it only shrinks it), which is what "no evidence" should do.
    """
    flat = maps.detach().flatten(1).float()
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    out = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), torch.zeros_like(flat))
    return out.view(maps.shape)


def relevance_to_maps(rel: Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> Tensor:
    """CLS-to-patch row of R (skipping CLS, register and prompt tokens) → (B, gh, gw) in [0, 1]."""
    row = rel[:, 0, num_prefix_tokens:]
    gh, gw = grid
    if row.shape[1] != gh * gw:
        raise ModelError(
            f"{rel.shape[1]} tokens - {num_prefix_tokens} prefix tokens = {row.shape[1]} patches, "
            f"which does not fill the {gh}x{gw} grid; pass num_prefix_tokens= / grid= explicitly"
        )
    return minmax_normalize(row.reshape(-1, gh, gw))


def _resolve_start(start_layer: int, num_layers: int) -> int:
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not -num_layers <= start_layer < num_layers:
        raise ConfigError(
            f"start_layer={start_layer!r} is not accepted for a {num_layers}-block transformer; "
            f"use an integer in [{-num_layers}, {num_layers - 1}] (0 = all layers, -1 = last layer only)"
        )
    return start_layer % num_layers


# ----------------------------------------------------------------------------- extractor
class Recording:
    """Attention tensors captured during a training forward (see :meth:`AttentionRelevance.record`)."""

    def __init__(self, owner: "AttentionRelevance", num_layers: int) -> None:
        self.owner = owner
        self.attns: list[Tensor | None] = [None] * num_layers
        self.grads: list[Tensor | None] | None = None  # set by target_grads (exact variant)

    def _needed(self) -> list[Tensor]:
        start = self.owner.start
        attns = self.attns[start:]
        if any(a is None for a in attns):
            raise RuntimeError("no attention was recorded: run the model's forward inside `with extractor.record()`")
        if not all(a.requires_grad for a in attns):  # type: ignore[union-attr]
            raise ModelError(
                "the recorded attention is not part of the autograd graph (frozen image tower, e.g. CoOp / "
                "LoCoOp): use the separate pass AttentionRelevance(images, targets, logits_fn) instead"
            )
        return attns  # type: ignore[return-value]

    def target_grads(self, logits: Tensor, targets: Tensor) -> None:
        """Exact variant: gradients of the target logits (call before ``loss.backward()``).

        ``logits`` (B, K) must come from the recorded forward; ``targets`` (B,) class ids.
        Costs one partial backward through the head and the blocks >= start_layer.
        """
        attns = self._needed()
        selected = _select_logits(getattr(logits, "logits", logits), targets).sum()
        grads = torch.autograd.grad(selected, attns, retain_graph=True)
        self.grads = [None] * self.owner.start + list(grads)

    def maps(self, from_loss: bool = True, grad_scale: float = 1.0) -> Tensor:
        """(B, gh, gw) maps in [0, 1] for every row of the recorded batch (slice the clean rows).

        Uses the :meth:`target_grads` gradients when present, else the gradients retained by
        the backward: with ``from_loss=True`` that backward was of a loss to minimise and
        ``-∂loss/∂A`` is used (so "lowers the loss" counts as evidence, like a positive
        target-logit gradient); ``from_loss=False`` if you back-propagated a score to maximise
        (e.g. the target logits).  With a batch-mean loss the gradients carry a 1/B factor; the
        last-layer-only map is invariant to it (min-max), a multi-layer map is not.
        ``grad_scale``: the loss scale of that backward (a GradScaler under fp16); the retained
        gradients are divided by it, so multi-layer maps see the true gradients.
        """
        attns = self._needed()
        if self.grads is not None:
            grads = self.grads
        else:
            if any(a.grad is None for a in attns):
                raise RuntimeError("the recorded attention has no gradient yet: call loss.backward() "
                                   "(or Recording.target_grads) first")
            if not grad_scale > 0:
                raise ValueError(f"grad_scale must be positive, got {grad_scale}")
            sign = (-1.0 if from_loss else 1.0) / float(grad_scale)
            grads = [None] * self.owner.start + [sign * a.grad.float() for a in attns]  # type: ignore[union-attr]
        rel = relevance_from_attentions(self.attns, grads, self.owner.start)
        return self.owner.to_maps(rel)


def _select_logits(logits: Tensor, targets: Tensor) -> Tensor:
    if logits.dim() != 2:
        raise ModelError(f"logits_fn must return (B, K) logits, got shape {tuple(logits.shape)}")
    targets = torch.as_tensor(targets, device=logits.device).long().view(-1)
    if targets.shape[0] != logits.shape[0]:
        raise ModelError(f"{targets.shape[0]} targets for {logits.shape[0]} images")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise ModelError(f"targets must be class ids in [0, {logits.shape[1] - 1}], got {targets.tolist()}")
    return logits.gather(1, targets[:, None]).squeeze(1)


class AttentionRelevance:
    """Gradient-weighted attention relevance (Chefer et al. 2021) → (B, gh, gw) maps in [0, 1].

    ``model``: a CLIP / open_clip ViT / timm ViT / adapter around one, or the list of its image
    blocks.  ``start_layer``: first block of the recursion (0 = all layers, the supplement's
    "accumulating" reading; -1 = last block only, Chefer's CLIP default).  ``num_prefix_tokens``
    (CLS + registers + VPT prompts, which must come right after CLS) and ``grid`` default to the
    model's attributes (``num_prefix_tokens``, ``grid_size`` / ``patch_embed.grid_size``) or are
    inferred from the token count (square grid).

    The extractor leaves the model's train/eval mode alone: call it in eval mode for dropout-free maps.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        start_layer: int = DEFAULT_START_LAYER,
        num_prefix_tokens: int | None = None,
        grid: tuple[int, int] | None = None,
    ) -> None:
        self.blocks = resolve_blocks(model)
        check_supported(self.blocks)  # fail now, not at the first call, on an unsupported attention
        self.start = _resolve_start(start_layer, len(self.blocks))
        self.start_layer = start_layer
        is_blocks = isinstance(model, (list, tuple, nn.ModuleList, nn.Sequential))
        self.num_prefix_tokens = num_prefix_tokens if num_prefix_tokens is not None else (
            None if is_blocks else model_prefix_tokens(model))
        self.grid = tuple(grid) if grid is not None else None
        self._model_grid = None if is_blocks else model_grid(model)
        if self.num_prefix_tokens is not None and self.num_prefix_tokens < 1:
            raise ConfigError(f"num_prefix_tokens={self.num_prefix_tokens}: the map is the CLS row, so at least 1 "
                              f"prefix token (CLS) is needed")

    def layout(self, num_tokens: int) -> tuple[int, tuple[int, int]]:
        """(num_prefix_tokens, grid) for a sequence of ``num_tokens`` tokens."""
        prefix, grid = self.num_prefix_tokens, self.grid
        if prefix is None:
            hint = grid or self._model_grid
            prefix = num_tokens - hint[0] * hint[1] if hint and 0 < hint[0] * hint[1] < num_tokens else 1
        patches = num_tokens - prefix
        if grid is None:
            side = math.isqrt(max(patches, 0))
            if self._model_grid and self._model_grid[0] * self._model_grid[1] == patches:
                grid = self._model_grid
            elif side * side == patches:
                grid = (side, side)
            else:
                raise ModelError(f"{num_tokens} tokens with {prefix} prefix tokens leave {patches} patches, "
                                 f"not a square grid; pass grid=(gh, gw) explicitly")
        return prefix, grid  # type: ignore[return-value]

    def to_maps(self, rel: Tensor) -> Tensor:
        prefix, grid = self.layout(rel.shape[-1])
        return relevance_to_maps(rel, prefix, grid)

    def __call__(self, images: Tensor, targets: Tensor, logits_fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Maps for ``targets`` (B,) from a separate forward + partial backward.

        ``logits_fn(images) -> (B, K)`` (or a ModelOutput) must run the image tower whose blocks were given (e.g.
        CLIP cosine · logit_scale against class text embeddings, or a ViT head).  The backward
        is of the sum of the selected logits; samples do not interact in a ViT (LayerNorm and
        attention are per sample), so each map gets its own image's gradient.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError("attention relevance needs autograd; call it outside torch.inference_mode()")
        start = self.start
        attns: list[Tensor | None] = [None] * len(self.blocks)

        def record(i: int, attn: Tensor) -> Tensor:
            if i < start or attns[i] is not None:  # first call per block (a re-run never replaces it)
                return attn
            if i == start:  # graph starts here: backward stops at this block
                attn = attn.detach().requires_grad_(True)
            attns[i] = attn
            return attn

        with torch.enable_grad(), explicit_attention(self.blocks, record, no_grad_below=start, explicit_from=start):
            out = logits_fn(images)
            selected = _select_logits(getattr(out, "logits", out), targets).sum()  # ModelOutput or tensor
        needed = attns[start:]
        if any(a is None for a in needed):
            raise ModelError("logits_fn did not run the transformer blocks given to AttentionRelevance")
        grads = torch.autograd.grad(selected, needed, allow_unused=True)  # type: ignore[arg-type]
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(needed, grads)]  # type: ignore[arg-type]
        rel = relevance_from_attentions(attns, [None] * start + grads, start)
        return self.to_maps(rel)

    @contextmanager
    def record(self) -> Iterator[Recording]:
        """Capture the attention of a training forward for maps after its own backward.

        ::

            with extractor.record() as rec:
                out = model(clean_images)            # VPT: gradients reach the image tower
                rec.target_grads(out.logits, labels) # optional: exact target-logit gradient
            loss.backward()
            maps = rec.maps()

        Only the first forward inside the block is recorded (e.g. the clean images), and only the
        blocks from ``start_layer`` on run with explicit attention (the others keep fused kernels).
        """
        rec = Recording(self, len(self.blocks))
        start = self.start

        def record(i: int, attn: Tensor) -> Tensor:
            if i >= start and rec.attns[i] is None:
                if attn.requires_grad:
                    attn.retain_grad()
                rec.attns[i] = attn
            return attn

        with explicit_attention(self.blocks, record, explicit_from=start):  # blocks before start stay fused
            yield rec


def clip_logits_fn(model: nn.Module, text_features: Tensor, logit_scale: float | Tensor | None = None
                   ) -> Callable[[Tensor], Tensor]:
    """CLIP zero-shot logits ``scale · cos(image, text_k)`` as a ``logits_fn``.

    ``text_features`` (K, D) class text embeddings (normalised here); ``logit_scale`` defaults
    to ``model.logit_scale.exp()`` (100 for trained CLIP).
    """
    text = F.normalize(text_features.detach(), dim=-1)

    def logits_fn(images: Tensor) -> Tensor:
        scale = logit_scale if logit_scale is not None else model.logit_scale.detach().exp()
        image = F.normalize(model.encode_image(images), dim=-1)
        return scale * image @ text.to(image.dtype).t()

    return logits_fn
