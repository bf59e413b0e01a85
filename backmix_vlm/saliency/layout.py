"""Where the image blocks, prefix tokens and patch grid of a ViT / CLIP / adapter are.

:func:`resolve_blocks` finds the image tower's transformer blocks (known layouts first, then
the only block list whose attention :mod:`.explicit` supports); :func:`model_prefix_tokens`
and :func:`model_grid` read the ``num_prefix_tokens`` / ``grid_size`` a model declares.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..errors import ModelError
from .explicit import attention_types

_BLOCK_PATHS = ("visual.transformer.resblocks", "transformer.resblocks", "blocks")


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _is_block_list(obj: Any) -> bool:
    if not isinstance(obj, (nn.ModuleList, nn.Sequential)) or len(obj) == 0:
        return False
    return all(isinstance(getattr(b, "attn", None), attention_types()) for b in obj)


def resolve_blocks(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The image tower's transformer blocks of a CLIP / open_clip ViT / timm ViT / adapter.

    Known layouts first (``visual.transformer.resblocks``, ``transformer.resblocks``,
    ``blocks``); otherwise the only block list inside the model (one under ``visual`` wins, so a
    wrapped CLIP picks its image tower, not its text tower).  A list of blocks is used as is.
    """
    if isinstance(model, (list, tuple)) or (isinstance(model, (nn.ModuleList, nn.Sequential))
                                             and _is_block_list(model)):
        return list(model)
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if _is_block_list(blocks):
            return list(blocks)
    found = [(name, m) for name, m in model.named_modules() if _is_block_list(m)]
    visual = [(n, m) for n, m in found if "visual" in n.split(".")]
    if len(visual) == 1 or len(found) == 1:
        return list((visual or found)[0][1])
    names = ", ".join(n or "<model>" for n, _ in found) or "none"
    raise ModelError(
        f"cannot tell which transformer blocks of {type(model).__name__} form the image tower "
        f"(candidates: {names}); pass the block list to AttentionRelevance explicitly"
    )


def model_prefix_tokens(model: nn.Module) -> int | None:
    """``num_prefix_tokens`` of the outermost module that has one (a VPT wrapper before its ViT)."""
    for module in model.modules():
        n = getattr(module, "num_prefix_tokens", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def model_grid(model: nn.Module) -> tuple[int, int] | None:
    """The patch grid the model was built for (open_clip ``grid_size``, timm ``patch_embed.grid_size``)."""
    for module in model.modules():
        grid = getattr(module, "grid_size", None)
        if isinstance(grid, (tuple, list)) and len(grid) == 2:
            return int(grid[0]), int(grid[1])
    return None
