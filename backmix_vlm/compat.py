"""The one place that reaches into other libraries' private internals.

Everything here depends on code that open_clip, timm or Accelerate do not promise to keep
(names with a leading underscore, class-level singletons, a process-wide patch).  Each reach is
one small function, and :data:`TESTED` lists the version range of each library it was tested
with — the same bounds as ``pyproject.toml`` (``tests/test_compat.py`` checks that they agree
and that the installed versions are inside them).  When a library moves, this file is the only
one to change.

* open_clip: :func:`add_open_clip_config_dir` (``open_clip.factory._MODEL_CONFIG_PATHS``),
  :func:`clip_embed` (``VisionTransformer._embeds``), :func:`clip_pool` (``VisionTransformer._pool``);
* timm: :func:`timm_pos_embed` (``VisionTransformer._pos_embed``), :func:`recording_load_state_dict`
  (``timm.create_model`` gives no report of what its weights covered; we record
  ``nn.Module.load_state_dict``'s return value with a process-wide patch, under a lock);
* torch: :func:`cpu_native_bf16` (``torch.ops.mkldnn._is_mkldnn_bf16_supported``: torch has no
  public check whether the CPU computes bf16 natively);
* Accelerate: :func:`reset_accelerate_state` (``AcceleratorState._shared_state`` /
  ``_reset_state``: a single process may train several runs with other precisions).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

#: distribution -> (lowest tested version, first version not tested); pyproject.toml has the same bounds
TESTED: dict[str, tuple[str, str]] = {
    "open_clip_torch": ("3.3.0", "4"),
    "timm": ("1.0.31", "1.1"),
    "accelerate": ("1.15.0", "2"),
}


# ----------------------------------------------------------------------------- versions
def _release(version: str) -> tuple[int, ...]:
    """``"1.0.31"`` -> (1, 0, 31); local / pre-release suffixes are ignored (``"2.1.0+cpu"`` -> (2, 1, 0))."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():  # "0rc1": the release part ends here
            break
    return tuple(parts)


def in_tested_range(version: str, low: str, high: str) -> bool:
    """``low <= version < high`` on the release numbers."""
    v = _release(version)
    return _release(low) <= v < _release(high)


def version_report() -> dict[str, tuple[str | None, bool]]:
    """``{distribution: (installed version or None, inside the tested range)}``."""
    out: dict[str, tuple[str | None, bool]] = {}
    for dist, (low, high) in TESTED.items():
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = (None, False)
            continue
        out[dist] = (version, in_tested_range(version, low, high))
    return out


def untested_versions() -> list[str]:
    """One line per installed library outside its tested range (empty when all are inside)."""
    return [f"{dist} {version} (tested: >={TESTED[dist][0]},<{TESTED[dist][1]})"
            for dist, (version, ok) in version_report().items() if version is not None and not ok]


# ----------------------------------------------------------------------------- open_clip
def add_open_clip_config_dir(folder: str | Path) -> None:
    """Make the model configs in ``folder`` open_clip model names (once per process)."""
    import open_clip
    from open_clip import factory

    folder = Path(folder)
    if folder not in [Path(p) for p in factory._MODEL_CONFIG_PATHS]:
        open_clip.add_model_config(folder)


def clip_embed(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """open_clip ``VisionTransformer``: patch embedding + [CLS] + positions + patch dropout + ``ln_pre``
    -> ``(B, 1 + P, W)``, the input of the first block (batch-first)."""
    return visual._embeds(images)


def clip_pool(visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip ``VisionTransformer``: ``ln_post`` + pooling of the last block's ``(B, T, W)`` output
    -> ``(pooled, tokens)`` (before ``proj``)."""
    return visual._pool(x)


# ----------------------------------------------------------------------------- timm
def timm_pos_embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer``: class / register tokens + position embedding on patch tokens."""
    return vit._pos_embed(x)


_LOAD_LOCK = threading.Lock()


@contextmanager
def recording_load_state_dict() -> Iterator[list[Any]]:
    """Collect the ``(missing_keys, unexpected_keys)`` report of every ``nn.Module.load_state_dict``
    call made inside the block (e.g. by ``timm.create_model(pretrained=True)``, which loads
    non-strictly and does not return the report).

    The patch is process-wide for the duration of the block; a lock keeps two threads from
    nesting it, and the original method is restored on exit, also after an exception.
    """
    from unittest import mock

    reports: list[Any] = []
    original = nn.Module.load_state_dict

    def recording(module: nn.Module, *args: Any, **kw: Any) -> Any:
        result = original(module, *args, **kw)
        reports.append(result)
        return result

    with _LOAD_LOCK, mock.patch.object(nn.Module, "load_state_dict", recording):
        yield reports


# ----------------------------------------------------------------------------- Accelerate
def reset_accelerate_state(precision: str, cpu: bool) -> None:
    """Forget Accelerate's process-wide state when a single-process run asks for another precision
    or device type than the state holds (it is a singleton; a multi-process state is never reset)."""
    from accelerate.state import AcceleratorState, PartialState

    shared = AcceleratorState._shared_state
    if shared and PartialState._shared_state.get("num_processes", 1) == 1:
        device_type = getattr(shared.get("device"), "type", None)
        same = shared.get("_mixed_precision") == precision and (device_type == "cpu") == cpu
        if not same:  # single process: safe to start over with other settings
            AcceleratorState._reset_state(reset_partial_state=True)


def accelerate_state_started() -> bool:
    """True when Accelerate's process state already exists (the device is then chosen)."""
    from accelerate.state import PartialState

    return bool(PartialState._shared_state)


# ----------------------------------------------------------------------------- torch
def cpu_native_bf16() -> bool:
    """True when oneDNN runs bf16 kernels natively on this CPU (AVX512-BF16 / AMX, or AVX512 cores it
    treats as bf16-capable); False on AVX2-only CPUs, where bf16 convolutions / matmuls are emulated,
    and where the probe is missing."""
    probe = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # a build without oneDNN
        return False
