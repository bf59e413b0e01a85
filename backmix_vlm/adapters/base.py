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
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import from_dict
from ..errors import ConfigError, ModelError
from ..models.output import ModelOutput
from ..registry import Registry

ADAPTERS: Registry[Callable[..., "Adapter"]] = Registry("adapter")


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter of ``module`` (in place) and return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


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
        return {n: p.detach().clone() for n, p in self._trainable_named()}

    def load_state_dict_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a :meth:`state_dict_trainable` checkpoint; names and shapes must match exactly."""
        own = dict(self._trainable_named())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ModelError(
                f"{type(self).__name__} checkpoint does not match the adapter: missing {missing}, "
                f"unexpected {unexpected}; expected exactly {sorted(own)}"
            )
        for name, p in own.items():
            value = state[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ModelError(
                    f"{type(self).__name__} checkpoint: '{name}' has shape {tuple(value.shape)}, "
                    f"the adapter expects {tuple(p.shape)} (different n_ctx / classes / tokens?)"
                )
            with torch.no_grad():
                p.copy_(value.to(device=p.device, dtype=p.dtype))

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
