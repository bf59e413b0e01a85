"""timm Vision Transformers: build by name, weights from a local file or the timm/HF cache.

``load_timm_vit(name, pretrained=PATH)`` loads a local checkpoint through timm's own
``pretrained_cfg_overlay=dict(file=PATH)`` path, so timm's checkpoint filters still run
(e.g. position-embedding resampling to ``img_size``).  ``pretrained=True`` uses timm's
download; offline, weights already in the Hugging Face cache still load, and otherwise it
fails in seconds with one clear message instead of a minute of hub retries.
"""
from __future__ import annotations

import difflib
import os
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..compat import recording_load_state_dict
from ..errors import ModelError, load_error_summary


def load_timm_vit(
    name: str,
    pretrained: bool | str | os.PathLike = False,
    img_size: int | None = None,
    num_classes: int = 0,
    config_section: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm model (``num_classes=0``: no head, ``forward`` returns pooled features).

    ``pretrained``: False (random init), True (timm's pretrained weights, cached or
    downloaded) or a path to a ``.safetensors`` / ``.pth`` / ``.bin`` state dict in timm's key
    layout (read locally, the hub is never asked).  Extra keyword arguments go to
    ``timm.create_model``.  ``config_section`` (e.g. ``backbone``) makes error messages name
    the job's config keys (``backbone.checkpoint=...``).
    """
    check_timm_name(name)
    if img_size is not None:
        kwargs["img_size"] = img_size
    kwargs["num_classes"] = num_classes

    if pretrained is False or pretrained is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is True:
        file = _cached_weights(name)
        if file is None:
            from ..runtime import hub_reachable

            if not hub_reachable():
                if config_section:
                    how = (f"set {config_section}.checkpoint=/path/to/model.safetensors (read locally, no hub), "
                           f"or {config_section}.pretrained=null for random init")
                else:
                    how = "pass the file: load_timm_vit(name, pretrained='/path/to/model.safetensors'), or pretrained=False"
                raise ModelError(
                    f"cannot load pretrained weights for timm '{name}': huggingface.co is unreachable and the "
                    f"weights are not in the Hugging Face cache (HF_HOME / HF_HUB_CACHE). Download the "
                    f"weights file elsewhere and {how}"
                )
            return _create(name, kwargs, None)
        return _create(name, kwargs, file)
    path = Path(pretrained)
    if not path.is_file():
        key = f"{config_section}.checkpoint: " if config_section else ""
        raise ModelError(f"{key}timm weights file not found: {path} (model '{name}'); give an existing "
                         f".safetensors/.pth/.bin file, true for timm's weights, or false")
    return _create(name, kwargs, str(path))


def check_timm_name(name: str) -> None:
    """ModelError listing similar names unless ``name`` (``arch`` or ``arch.tag``) is a timm model."""
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        known = timm.list_models("vit_*")
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        raise ModelError(f"unknown timm model '{name}'; {'similar: ' + ', '.join(close) if close else 'e.g. ' + ', '.join(known[:5])} "
                         f"(all: timm.list_models('vit_*'))")


def _create(name: str, kwargs: dict[str, Any], file: str | None) -> nn.Module:
    """``timm.create_model(pretrained=True)``, then check what the weights actually covered.

    timm loads non-strictly whenever ``num_classes`` differs from the checkpoint's (always
    with ``num_classes=0``), so a file for another architecture would silently leave random
    weights; we record ``load_state_dict``'s report and accept only a missing/unexpected head.
    """
    overlay = {"pretrained_cfg_overlay": dict(file=file)} if file else {}
    where = f"from {file}" if file else "from timm's hub"
    try:
        with recording_load_state_dict() as reports:
            model = timm.create_model(name, pretrained=True, **overlay, **kwargs)
    except (RuntimeError, OSError, KeyError, IndexError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ModelError(f"cannot load weights for timm '{name}' {where}: {load_error_summary(e)}; expected a "
                         ".safetensors / .pth / .bin state dict in timm's key layout for this architecture") from None
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)

    def off_head(keys: list[str]) -> list[str]:
        return [k for k in keys if not any(k == h or k.startswith(h + ".") for h in heads)]

    missing = off_head([k for r in reports for k in r.missing_keys])
    unexpected = off_head([k for r in reports for k in r.unexpected_keys])
    if not reports or missing or unexpected:
        raise ModelError(
            f"weights {where} do not fit timm '{name}': missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
            f"(is the file in timm's key layout for this architecture?)"
        )
    return model


def _cached_weights(name: str) -> str | None:
    """Path of already-downloaded weights for ``name`` (HF cache or torch-hub cache), else None."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, KeyError):
        cfg = None
    if cfg is None:
        raise ModelError(f"timm model '{name}' has no pretrained weights (or unknown tag); "
                         f"tags: {', '.join(timm.list_pretrained(name.split('.')[0] + '*')[:8]) or 'none'}")
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for fname in names:
            hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
            if isinstance(hit, str):
                return hit
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if cached.is_file():
            return str(cached)
    return None
