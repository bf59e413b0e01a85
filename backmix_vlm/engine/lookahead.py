"""airbench's scheduled Lookahead over the whole model state (weights and BatchNorm statistics).

Every ``every`` optimizer steps the slow copy moves toward the trained weights,
``slow <- slow + (1 - decay) * (fast - slow)``, and the trained weights are set to it;
``decay = decay_base ** every * (step / total_steps) ** power`` grows from 0 (the slow copy just
follows) to ``0.95 ** 5 ≈ 0.77`` at the end, and after the last step the model *is* the slow copy.
Unlike the original Lookahead optimizer (Zhang et al. 2019; ``timm.optim.Lookahead``: a fixed
``alpha``, parameters only) the mixing weight is scheduled and the BatchNorm running statistics
are averaged too, as in Keller Jordan's airbench94 (its ``LookaheadState``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class Lookahead:
    """The slow copy of ``model``'s floating-point state; :meth:`step` after every optimizer step."""

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5, decay_base: float = 0.95,
                 power: float = 3.0) -> None:
        if total_steps < 1 or every < 1:
            raise ValueError(f"Lookahead: total_steps={total_steps}, every={every}; expected >= 1")
        self.total_steps, self.every, self.decay_base, self.power = int(total_steps), int(every), decay_base, power
        # what training changes: trainable parameters and floating buffers (BatchNorm statistics); a
        # frozen tower's weights are left out (they never move, and a copy would double its memory)
        tracked = {n for n, p in model.named_parameters() if p.requires_grad}
        tracked |= {n for n, b in model.named_buffers() if b.is_floating_point()}
        self.slow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()
                                        if k in tracked}

    def decay(self, step: int) -> float:
        """Weight of the slow copy at optimizer step ``step`` (1-based count of steps done)."""
        return self.decay_base ** self.every * (min(step, self.total_steps) / self.total_steps) ** self.power

    @torch.no_grad()
    def step(self, model: nn.Module, step: int) -> None:
        """Call with the number of optimizer steps done so far; the last one leaves the slow copy."""
        if step % self.every == 0:
            self._sync(model, self.decay(step))
        if step == self.total_steps:
            self._sync(model, 1.0)

    def _sync(self, model: nn.Module, decay: float) -> None:
        for name, value in model.state_dict().items():
            slow = self.slow.get(name)
            if slow is not None:
                slow.lerp_(value.to(slow.dtype), 1.0 - decay)
                value.copy_(slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": {k: v.clone() for k, v in self.slow.items()}, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.slow) ^ set(state["slow"])
        if missing or int(state["total_steps"]) != self.total_steps:
            raise ValueError(f"Lookahead state does not match the model (keys differ: {sorted(missing)[:5]}, "
                             f"total_steps {state['total_steps']} vs {self.total_steps})")
        for k, v in state["slow"].items():
            self.slow[k].copy_(v)
