"""Batched, cached extraction of model outputs for OOD scoring.

A frozen encoder's outputs on a dataset never change, so they are computed once per
(model, dataset, transform) and reused by every score and every OOD set; the cache file
name carries a hash of exactly those parts (:func:`cache_key`), so a changed model or
transform never reads a stale file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from ..errors import DataError
from ..models.output import ModelOutput
from ..atomic import atomic_write_bytes
from ..runtime import autocast, progress
from ..validation import check_choice

if TYPE_CHECKING:
    from .scores import Score

OUTPUT_KEYS = ("logits", "features", "local_logits", "cam", "cosine", "local_cosine")


def cache_key(**parts: Any) -> str:
    """A short stable hash of the parts that determine the outputs (model, dataset, transform).

    Parts are serialised as sorted-key JSON (non-JSON values through ``str``), so the same
    parts always give the same key and any changed part gives a new one.
    """
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def cache_file(cache_dir: str | Path, name: str, **parts: Any) -> Path:
    """``cache_dir/<name>-<cache_key(parts)>.safetensors``: readable name, exact identity."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path(cache_dir) / f"{safe}-{cache_key(name=name, **parts)}.safetensors"


def model_fingerprint(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, values): a model's identity.

    Use it as the ``model`` part of :func:`cache_key` when the weights may change between
    runs (a fine-tuned checkpoint) and a name alone would not tell them apart.
    """
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)  # 0-dim tensors (logit_scale) cannot be viewed as bytes
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _unpack(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(images, labels, indices)`` / ``(images, labels)`` / ``images`` -> the three parts."""
    if isinstance(batch, Tensor):
        return batch, None, None
    images, *rest = batch
    labels = torch.as_tensor(rest[0]) if len(rest) > 0 else None
    indices = torch.as_tensor(rest[1]) if len(rest) > 1 else None
    return images, labels, indices


def extract_outputs(
    forward: Callable[[Tensor], ModelOutput | Tensor],
    loader: Iterable[Any],
    *,
    device: torch.device | str,
    precision: str = "no",
    cache_path: str | Path | None = None,
    desc: str = "",
    keep: tuple[str, ...] | None = None,
) -> dict[str, Tensor]:
    """Run ``forward`` over ``loader`` and return the concatenated outputs on CPU.

    The dict holds every non-None :class:`ModelOutput` field (only those in ``keep`` when
    given; e.g. drop ``cam`` to save memory) as float32, plus ``labels`` and ``indices``
    (int64) when the loader yields them.  Inference runs under ``torch.inference_mode`` with
    optional bf16 / fp16 autocast.  With ``cache_path`` the result is saved there
    (safetensors, atomic) and loaded instead of recomputed on the next call: build the path
    with :func:`cache_file` so it encodes the model, dataset and transform (and ``precision``
    / ``keep`` when they vary: a cache file is returned as saved).
    """
    if cache_path is not None and Path(cache_path).is_file():
        return load_file(str(cache_path))
    for key in keep or ():
        check_choice(key, OUTPUT_KEYS, "extract_outputs keep")
    device = torch.device(device)
    chunks: dict[str, list[Tensor]] = {}
    with torch.inference_mode(), autocast(device, precision):
        for batch in progress(loader, desc or "extract"):
            images, labels, indices = _unpack(batch)
            out = forward(images.to(device, non_blocking=True))
            if isinstance(out, Tensor):
                out = ModelOutput(logits=out)
            for key in OUTPUT_KEYS:
                value = getattr(out, key)
                if value is not None and (keep is None or key in keep):
                    chunks.setdefault(key, []).append(value.detach().float().cpu())
            for key, value in (("labels", labels), ("indices", indices)):
                if value is not None:
                    chunks.setdefault(key, []).append(value.detach().long().cpu())
    outputs = {k: torch.cat(v) for k, v in chunks.items()}
    if not outputs:
        raise DataError(f"extract_outputs{f' ({desc})' if desc else ''}: the loader yielded no batches")
    if cache_path is not None:
        save_outputs(cache_path, outputs, desc)
    return outputs


def save_outputs(path: str | Path, outputs: dict[str, Tensor], desc: str = "") -> None:
    """``extract_outputs``' cache file (safetensors, atomic)."""
    tensors = {k: v.contiguous() for k, v in outputs.items()}
    atomic_write_bytes(path, save(tensors, metadata={"desc": desc}))


def image_scores_loader(
    score: "Score",
    loader: Iterable[Any],
    *,
    device: torch.device | str,
    precision: str = "no",
    desc: str = "",
) -> Tensor:
    """A set-up score that runs the model (``"forward" in score.uses``, i.e. ODIN) over a loader:
    ``score.image_scores`` per batch, as one float32 CPU tensor in loader order."""
    device = torch.device(device)
    chunks = []
    with autocast(device, precision):
        for batch in progress(loader, desc or score.name):
            images, _, _ = _unpack(batch)
            chunks.append(score.image_scores(images.to(device)).detach().float().cpu())
    if not chunks:
        raise DataError(f"score '{score.name}'{f' ({desc})' if desc else ''}: the loader yielded no batches")
    return torch.cat(chunks)
