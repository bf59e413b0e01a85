"""Run directories: every run records exactly what ran beside its results."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

import yaml

from . import __version__
from .config import to_dict

if TYPE_CHECKING:
    import torch


def resolve_device(device: Any) -> torch.device:
    """``auto`` → CUDA when visible, else CPU; anything else must be a device torch accepts."""
    import torch

    from .errors import ConfigError

    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"run.device: {name!r} is not accepted; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} but no CUDA GPU is visible; use run.device=cpu or auto")
    return dev


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current git commit (with '-dirty' when the tree has changes), or None."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write via ``write(file)`` to a temp file + fsync + rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def make_run_dir(output_dir: str | Path, name: str | None, job: str) -> Path:
    """Create (or reuse, for --resume) the run directory ``output_dir/name``."""
    name = name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def record_run(run_dir: str | Path, cfg: Any, job: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Write ``config.yaml`` (fully resolved) and ``run_info.json`` (version, commit, command)."""
    run_dir = Path(run_dir)
    resolved = to_dict(cfg)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    import torch

    info = {
        "job": job,
        "backmix_vlm_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "command": argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(run_dir / "run_info.json", info)
    return info
