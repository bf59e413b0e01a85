"""Small helpers shared by the post-hoc detectors."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ...errors import ConfigError


def train_outputs(score, train: Mapping[str, Tensor] | None, keys: tuple[str, ...]) -> Mapping[str, Tensor]:
    """The training outputs ``score`` fits on, with ``keys`` present (a clear error naming the score otherwise)."""
    if train is None:
        raise ConfigError(f"score '{score.name}' must be fit on training outputs; this evaluation gives none (train)")
    score.check(train, keys)
    return train


def positive_int(value, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def not_set_up(name: str, what: str) -> ConfigError:
    return ConfigError(f"score '{name}' must be set up first ({what})")


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T * logsumexp(logits / T)``: the negative free energy every shaping score reports."""
    return temperature * torch.logsumexp(logits / temperature, dim=-1)
