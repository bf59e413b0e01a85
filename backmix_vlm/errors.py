"""User-facing errors.

Everything the user can fix (a bad config key, missing data, an unknown model name)
raises a subclass of :class:`BackmixError`.  The CLI prints these as one clear message
without a traceback; programming errors still raise normally.
"""
from __future__ import annotations


class BackmixError(Exception):
    """An error caused by user input, with a message that says what is accepted."""


class ConfigError(BackmixError, ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(BackmixError):
    """A dataset could not be found, read, or is empty."""


class ModelError(BackmixError):
    """A model name, tag or checkpoint file is invalid or unavailable."""


class RegistryError(BackmixError, KeyError):
    """A name was looked up in a registry that does not hold it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ProcessGroupError(BackmixError):
    """A process of a multi-process run waited for the others longer than ``run.process_timeout_s``,
    or another process of the run stopped."""


class RunDirError(BackmixError):
    """A run directory cannot be used as asked (taken by another run, locked, missing for --resume)."""


class DivergedError(BackmixError, FloatingPointError):
    """Training produced a non-finite loss (the run stays resumable from its last checkpoint)."""


#: errno values that mean "the machine / file system refused", not a bug: reported as one line
ENVIRONMENT_ERRNOS = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is used up",
                      "EROFS": "the file system is read-only", "EACCES": "permission denied",
                      "EPERM": "permission denied"}


def environment_message(error: OSError) -> str | None:
    """One line for an OSError of the environment (disk full, read-only or forbidden folder), naming the
    file and what to do; None for other OSErrors (those stay tracebacks: they are bugs or rarities)."""
    import errno as errno_mod

    name = errno_mod.errorcode.get(error.errno or 0, "")
    if name not in ENVIRONMENT_ERRNOS:
        return None
    path = error.filename or "a file"
    if name in ("ENOSPC", "EDQUOT"):
        todo = "free some space (or write elsewhere with run.output_dir=<folder on another disk>)"
    else:
        todo = ("write elsewhere: run.output_dir=<a writable folder> (visualize: --out <folder>; eval writes "
                "into the run folder: copy the run somewhere writable)")
    return f"cannot write {path}: {ENVIRONMENT_ERRNOS[name]} ({name}); {todo}"


def load_error_summary(error: BaseException) -> str:
    """One short phrase for why a weights / checkpoint file could not be read.

    ``torch.load`` reports files that are not torch archives with bare internals such as
    ``KeyError: 101`` or ``IndexError: pop from empty list``; those become "not a torch or
    safetensors file" instead.
    """
    import pickle

    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, (KeyError, IndexError, pickle.UnpicklingError, EOFError)) or "Weights only load" in text \
            or "invalid load key" in text or "failed finding central directory" in text:
        return "not a torch or safetensors weights file (or truncated)"
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def user_message(error: BaseException) -> str:
    """The one-line message the CLI prints for a :class:`BackmixError`.

    A DataLoader worker re-raises the worker's error with ``"Caught DataError in DataLoader
    worker process 0. Original Traceback ..."`` as its message; only the original message is kept,
    so a corrupt image reads the same from a worker as from the main process.
    """
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        name = type(error).__name__
        lines = text.rstrip().splitlines()
        for i in range(len(lines) - 1, -1, -1):
            head, sep, rest = lines[i].partition(": ")
            if sep and not head.startswith(" ") and (head == name or head.endswith("." + name)):
                return "\n".join([rest, *lines[i + 1:]]).strip()
    return text
