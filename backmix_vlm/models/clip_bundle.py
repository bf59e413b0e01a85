"""What every CLIP loader returns and shares: the :class:`ClipBundle`, the blocks' tensor layout and
the state-dict reader.  :mod:`.clip` (open_clip names and tags) and :mod:`.hf_clip` (transformers
checkpoints) both build on it, so neither imports the other's loader back.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from ..errors import ModelError, load_error_summary


@dataclass
class ClipBundle:
    """A CLIP model with everything needed to feed it (open_clip returns these together)."""

    model: nn.Module                    # open_clip CLIP, eval mode, requires_grad False
    tokenizer: Callable[..., torch.Tensor]
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_eval: Callable[[Any], torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | tuple[int, int]   # int for square inputs (every CLIP we know)
    name: str
    pretrained: str | None              # tag, or the checkpoint path the weights came from


LAYOUTS = ("auto", "batch_first", "seq_first")


def set_block_layout(model: nn.Module, layout: str, device: str | torch.device = "cpu") -> None:
    """Feed both towers' blocks batch-first ``(N, L, D)`` or sequence-first ``(L, N, D)``."""
    if layout not in LAYOUTS:
        raise ModelError(f"layout {layout!r} is not accepted; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = "seq_first" if torch.device(device).type == "cpu" else "batch_first"
    first = layout == "batch_first"
    for owner in (getattr(model, "visual", None), model):
        tower = getattr(owner, "transformer", None)
        if tower is None or not hasattr(tower, "resblocks") or not hasattr(tower, "batch_first"):
            continue
        tower.batch_first = first
        for block in tower.resblocks:
            attn = getattr(block, "attn", None)
            if isinstance(attn, nn.MultiheadAttention) or hasattr(attn, "batch_first"):  # + LoRA's SplitAttention
                attn.batch_first = first


ACCEPTED_CHECKPOINTS = (
    "accepted: a CLIP state dict for this architecture in open_clip / OpenAI / transformers key format "
    "(.pt/.pth/.bin/.safetensors, optionally under 'state_dict', or an OpenAI JIT archive), or a transformers "
    "CLIP save_pretrained folder (config.json + weights)"
)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` (open_clip's reader, plus OpenAI JIT archives)."""
    path = str(path)
    try:
        sd = open_clip.factory.load_state_dict(path, device="cpu")
    except Exception as first:  # noqa: BLE001 - any reader failure becomes one clear message
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation
                sd = torch.jit.load(path, map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                sd.pop(key, None)
        except Exception:  # noqa: BLE001
            raise ModelError(f"checkpoint {path}: cannot be read ({load_error_summary(first)}); "
                             f"{ACCEPTED_CHECKPOINTS}") from None
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"checkpoint {path}: is not a mapping of parameter names to tensors; "
                         f"{ACCEPTED_CHECKPOINTS}")
    return dict(sd)
