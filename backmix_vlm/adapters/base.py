"""Adapter base class and registry (peft style).

An adapter wraps a *frozen* base model and adds a few trainable parameters (prompt
vectors, a linear head).  Three rules every adapter follows, so the engine can treat them
all alike:

* every base parameter has ``requires_grad=False`` — an optimizer built from
  ``adapter.parameters()`` or ``adapter.trainable_parameters()`` never touches the base;
* the base stays in eval mode even while the adapter trains (no dropout / patch dropout /
  BatchNorm statistics drift inside the frozen network), see :meth:`Adapter.train`;
* ``forward(images)`` returns a :class:`~backmix_vlm.models.output.ModelOutput` and
  ``loss(output, labels)`` is the training objective.

Checkpoints only need :meth:`Adapter.state_dict_trainable` (kilobytes instead of the
hundreds of megabytes of a CLIP backbone).

**The map path.**  BackMix's attention maps (:mod:`backmix_vlm.engine.adapter_task`) ask the
adapter, never guess the model family: :attr:`Adapter.maps_from_backward` (gradients of the
training loss reach the image tower: maps from the training backward), :attr:`~Adapter.image_blocks`,
:attr:`~Adapter.num_prefix_tokens`, :attr:`~Adapter.patch_size`, :meth:`~Adapter.map_logits_fn`
(images → logits for a separate pass), :meth:`~Adapter.tail_logits_fn` (input of block ``start``
→ logits: the rest of a frozen CLIP image tower and the text head) and
:meth:`~Adapter.keep_text_features` (the class text features of a training forward, kept for
that tail).  The image tower is seen through one view (:mod:`.vision`), the one VPT runs.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import from_dict
from ..errors import ConfigError, ModelError
from ..models.output import ModelOutput
from ..registry import Registry
from .vision import ClipVision, TimmViT, vision_view

ADAPTERS: Registry[Callable[..., "Adapter"]] = Registry("adapter")


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter of ``module`` (in place) and return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------- trainable state
def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of ``module``'s parameters with ``requires_grad`` (its trainable set).

    The one definition of "trainable state": :meth:`Adapter.state_dict_trainable` and the
    trainer's ``trainable_only`` checkpoints (:func:`backmix_vlm.engine.checkpoint.model_state_dict`).
    """
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor],
                              owner: str = "checkpoint") -> None:
    """Copy a :func:`trainable_state_dict` into ``module``; names and shapes must match exactly
    (a :class:`ModelError` starting with ``owner`` lists what differs)."""
    own = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelError(
            f"{owner} does not match the model's trainable parameters: missing {missing}, "
            f"unexpected {unexpected}; expected exactly {sorted(own)}"
        )
    for name, p in own.items():
        value = state[name]
        if tuple(value.shape) != tuple(p.shape):
            raise ModelError(
                f"{owner}: '{name}' has shape {tuple(value.shape)}, the model expects {tuple(p.shape)} "
                f"(different n_ctx / classes / tokens?)"
            )
        with torch.no_grad():
            p.copy_(value.to(device=p.device, dtype=p.dtype))


class Adapter(nn.Module):
    """A frozen ``base`` plus trainable adapter parameters.

    Subclasses set ``config_class`` (a dataclass) and implement :meth:`forward`.
    """

    config_class: type = type(None)

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = freeze(base)
        self.base.eval()

    # ------------------------------------------------------------------ train / eval
    def train(self, mode: bool = True) -> "Adapter":
        """Set train mode on the adapter's own modules; the frozen base always stays in eval."""
        super().train(mode)
        self.base.eval()
        return self

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should see (everything outside the base)."""
        return [p for _, p in self._trainable_named()]

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, _ in self._trainable_named()]

    def _trainable_named(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # ------------------------------------------------------------------ checkpoints
    def state_dict_trainable(self) -> dict[str, torch.Tensor]:
        """Only the trainable tensors (detached copies) — a small, base-independent checkpoint."""
        return trainable_state_dict(self)

    def load_state_dict_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a :meth:`state_dict_trainable` checkpoint; names and shapes must match exactly."""
        load_trainable_state_dict(self, state, owner=f"{type(self).__name__} checkpoint")

    # ------------------------------------------------------------------ the map path (BackMix)
    #: gradients of the training loss reach the image tower (VPT, LoRA on the vision tower): BackMix
    #: maps are read from the training backward instead of a pass of their own
    maps_from_backward: bool = False
    #: ``encode_text()`` returns the (K, E) class text features (CLIP text-side adapters)
    encodes_text: bool = False
    _text_sink: list[torch.Tensor] | None = None  # set only inside keep_text_features()

    @property
    def vision(self) -> ClipVision | TimmViT:
        """The view of the base's image tower (:mod:`.vision`), built on first use."""
        view = self.__dict__.get("view")
        if view is None:
            view = vision_view(self.base, type(self).__name__)
            self.__dict__["view"] = view
        return view

    @property
    def image_blocks(self) -> list[nn.Module]:
        """The image tower's transformer blocks, in order (what the attention relevance reads)."""
        return list(self.vision.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in every image block's sequence (class, registers, prompts)."""
        return self.vision.num_prefix_tokens

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.vision.patch_size)  # type: ignore[return-value]

    def map_logits_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``images -> (B, K)`` logits a separate map pass differentiates.

        The adapter's own logits when its gradients reach the image tower; else CLIP's
        ``logit_scale · cos(image, text)`` of the frozen image tower against the adapter's text
        features (computed once, here).
        """
        if self.maps_from_backward:
            return lambda x: self(x).logits
        from ..saliency.relevance import clip_logits_fn

        with torch.no_grad():
            text = self.encode_text()
        return clip_logits_fn(self.base, text)

    def tail_logits_fn(self, start: int, text_features: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> logit_scale · cos(image, text)`` where ``x`` (B, T, D, batch-first) is the input of image
        block ``start``: the rest of a frozen open_clip image tower (blocks ``start..L-1``, pooling,
        projection) — what :meth:`map_logits_fn` computes after block ``start``."""
        view = self.vision
        if not isinstance(view, ClipVision):
            raise ModelError(f"{type(self).__name__}: the tail pass needs an open_clip image tower")
        base = self.base
        blocks = list(view.blocks)[start:]
        text = F.normalize(text_features.detach(), dim=-1)

        def tail(x: torch.Tensor) -> torch.Tensor:
            image = F.normalize(view.pool(view.run_blocks(blocks, x)), dim=-1)
            return base.logit_scale.detach().exp() * image @ text.to(image.dtype).t()

        return tail

    @contextmanager
    def keep_text_features(self) -> Iterator[list[torch.Tensor]]:
        """Within the block, the first forward's class text features (what ``encode_text()`` returned,
        detached) are appended to the yielded list: the training forward computes them anyway, and the
        map path's tail pass reuses them instead of another text-tower forward."""
        sink: list[torch.Tensor] = []
        previous, self._text_sink = self._text_sink, sink
        try:
            yield sink
        finally:
            self._text_sink = previous

    def _emit_text_features(self, text: torch.Tensor) -> torch.Tensor:
        """Forwards call this with their ``encode_text()`` result (see :meth:`keep_text_features`)."""
        sink = self._text_sink
        if sink is not None and not sink:
            sink.append(text.detach())
        return text

    # ------------------------------------------------------------------ forward / loss
    def forward(self, images: torch.Tensor) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, output: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
        """Training objective; plain cross-entropy on the logits unless the method adds terms."""
        return F.cross_entropy(output.logits, labels)

    def regularizer(self, output: ModelOutput, labels: torch.Tensor) -> torch.Tensor | None:
        """The weighted extra term :meth:`loss` adds to cross-entropy (None: plain cross-entropy).

        The trainer uses it to keep the term when labels are mixed per row (Mixup / CutMix
        alongside the originals), where the loss is built from per-row cross-entropy.
        """
        return None


def resolve_config(cls: type, cfg: Any, where: str = "adapter") -> Any:
    """``None`` → defaults, a mapping → strict ``from_dict``, an instance of ``cls`` → itself."""
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, Mapping):
        return from_dict(cls, dict(cfg), where)
    if dataclasses.is_dataclass(cfg):
        raise ConfigError(f"{where}: got a {type(cfg).__name__}, this adapter needs a {cls.__name__}")
    raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {cfg!r}")


def create_adapter(method: str, base: Any, classnames: Sequence[str], cfg: Any = None, **kwargs: Any) -> Adapter:
    """Build the adapter registered as ``method`` (coop | locoop | vpt) around ``base``.

    ``cfg`` may be the method's config dataclass, a plain mapping of its fields (validated
    strictly: unknown keys fail by name) or None for the defaults.  Extra keyword arguments
    (e.g. ``tokenizer=``) go to the adapter's constructor.
    """
    cls = ADAPTERS.get(method)
    config = resolve_config(cls.config_class, cfg, where=f"adapter ({method})")
    return cls(base, classnames, config, **kwargs)
