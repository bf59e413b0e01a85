"""Atomic file writes: temp file + fsync + rename, so a crash never leaves half a file.

Every file the package writes goes through :func:`atomic_write` (checkpoints, records, results,
caches).  Files get the mode a plain ``open(path, "w")`` would give (``0o666`` minus the umask).
A killed process can leave its temp file (``.<name>.<random>.tmp``) behind;
:func:`remove_leftover_temps` deletes those under a folder nobody else is writing.

Layer: a foundation (imports nothing of the package), so any module may write files with it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

TEMP_GLOB = ".*.tmp"  #: the temp files :func:`atomic_write` creates beside their target


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_os_error(error: RuntimeError, path: Path) -> OSError | None:
    """torch.save reports a failed write (a full disk) as ``RuntimeError: [enforce fail at
    inline_container.cc:...] unexpected pos ...`` / ``PytorchStreamWriter failed writing file``: an OSError
    naming ``path`` (ENOSPC when the disk has next to no space left), else None."""
    text = str(error)
    if not any(k in text for k in ("inline_container", "unexpected pos", "PytorchStreamWriter", "file write failed")):
        return None
    try:
        full = shutil.disk_usage(path.parent).free < 64 * 2**20
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, f"{os.strerror(code)} ({text.strip().splitlines()[-1][:120]})", str(path))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write via ``write(file)`` to a temp file + fsync + rename: a crash never leaves half a file.

    The file gets the mode a plain ``open(path, "w")`` would give (``0o666`` minus the umask),
    not the ``0o600`` of the temp file, so results can be shared like any other file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # name the file the user will look for
            e.filename = str(path)
        converted = _as_os_error(e, path) if isinstance(e, RuntimeError) else None
        if converted is not None:
            raise converted from e
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def remove_leftover_temps(folder: str | Path) -> None:
    """Delete the temp files of atomic writes a killed process left under ``folder``
    (``.last.pt.<random>.tmp``); call it only while no other process writes there (a run's lock)."""
    for tmp in Path(folder).rglob(TEMP_GLOB):
        try:
            tmp.unlink()
        except OSError:
            pass
