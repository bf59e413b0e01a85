"""Atomic checkpoints and the RNG / data-order state needed for an exact resume.

A checkpoint is one ``torch.save``-d dict (see :class:`~backmix_vlm.engine.trainer.Trainer`
for its keys).  Saving goes through a temp file in the same folder, ``fsync`` and
``os.replace``, so a crash or a full disk leaves the previous ``last.pt`` intact — never a
half-written one.  Everything stored is plain tensors / numbers / strings, so loading uses
``torch.load(weights_only=True)`` and never runs pickled code from a checkpoint file.

Exact resume rests on three things saved here:

* every random number generator that training touches (python ``random``, numpy, torch CPU,
  CUDA, and the named ``torch.Generator`` objects of the mixer and the data loader);
* the data order, which is a pure function of ``(seed, epoch, rank)`` (see
  :func:`epoch_seed`), so the epoch counter *is* the data-order state;
* the model / optimizer / scheduler / mask-bank state dicts.
"""
from __future__ import annotations

import os
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError, load_error_summary

LAST = "last.pt"
BEST = "best.pt"


# ----------------------------------------------------------------------------- files
def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename)."""
    from ..atomic import atomic_write

    path = atomic_write(path, lambda f: torch.save(state, f))
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    require: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`~backmix_vlm.errors.ModelError` naming the file when it is missing,
    truncated / corrupt, not a torch file at all (a text or image file: torch itself reports
    such files as ``KeyError: 101``), not a checkpoint dict, or lacks a key in ``require``.
    """
    path = Path(path)
    expected = f"expected a training checkpoint written by backmix-vlm train / fewshot ({LAST})"
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path} (a run directory holds {LAST} after its first epoch)")
    if not zipfile.is_zipfile(path):
        what = "is truncated or not a torch checkpoint" if path.stat().st_size else "is empty"
        raise ModelError(f"checkpoint {path} is corrupt or not a torch checkpoint: the file {what}; {expected}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch reports foreign files with bare internals (KeyError: 101)
        raise ModelError(f"checkpoint {path} is corrupt or not a torch checkpoint: {load_error_summary(e)}; "
                         f"{expected}") from None
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict of training state")
    missing = [k for k in require if k not in state]
    if missing:
        raise ModelError(f"checkpoint {path} has no {', '.join(repr(k) for k in missing)} entry "
                         f"(keys: {', '.join(map(str, list(state)[:8]))}); {expected}")
    return state


# ----------------------------------------------------------------------------- model state
def model_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict, or only its trainable parameters (adapters over a frozen base).

    A CNN trained from scratch saves everything (BatchNorm buffers included); an adapter saves
    just the parameters with ``requires_grad`` so checkpoints stay small.
    """
    model = _unwrap(model)
    if not trainable_only:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from ..adapters.base import trainable_state_dict

    return trainable_state_dict(model)


def load_model_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], trainable_only: bool = False,
                          source: str | Path = "checkpoint") -> None:
    """Load :func:`model_state_dict` output back, failing clearly on mismatching keys."""
    model = _unwrap(model)
    if trainable_only:
        from ..adapters.base import load_trainable_state_dict

        load_trainable_state_dict(model, state, owner=str(source))
        return
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise ModelError(
            f"{source}: model weights do not match the configured model "
            f"(missing: {_few(missing)}; unexpected: {_few(unexpected)}); was it written by another model config?"
        )


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "") if keys else "none"


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / compile wrappers so keys never carry a ``module.`` prefix."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ----------------------------------------------------------------------------- RNG state
def epoch_seed(seed: int, epoch: int, rank: int = 0, stream: int = 0) -> int:
    """A distinct 63-bit seed per (run seed, epoch, process, stream).

    The data order and the loader workers' augmentation seeds derive from it, which makes
    them a function of the epoch alone: resuming at an epoch boundary replays them exactly.
    """
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank, stream])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) >> 1


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state of this process as plain tensors / numbers (``weights_only``-loadable)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (generators are restored in place by name)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise ModelError(f"checkpoint has no state for random generator '{name}' (has: {', '.join(saved) or 'none'})")
        g.set_state(saved[name])
