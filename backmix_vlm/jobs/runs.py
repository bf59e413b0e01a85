"""Run directories: every run records exactly what ran beside its results, and owns its folder.

Rules (see docs/architecture.md, "Run directories"):

* **One run per directory.**  A new run into a folder that already holds a run refuses, naming
  the folder, ``--resume`` and a fresh ``run.name``; ``--overwrite`` replaces it explicitly.
* **Validate first, create late.**  Jobs check their config, data and model name before
  :func:`open_run` creates the folder; a fresh run that fails before its first checkpoint
  leaves no folder behind, and a failing ``--resume`` leaves ``config.yaml`` /
  ``run_info.json`` untouched.
* **A lock per run.**  ``.lock`` holds the writer's PID and host; a second process refuses, a
  lock whose process is gone (same host) is reported and taken over.
* **Resume restores what ran.**  :func:`resume_config` rebuilds the saved resolved config; an
  override that changes a result-affecting setting refuses unless allowed (the message lists
  the differences).
* Records are written atomically (:mod:`backmix_vlm.atomic`); a resume first deletes the temp files
  a killed process left.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import yaml

from .. import __version__
from ..atomic import atomic_write_text, remove_leftover_temps, write_json
from ..config import build_with_overrides, data_root_override, load_yaml, move_data_root, to_dict
from ..errors import ConfigError, RunDirError
from ..runtime import resolve_run_precision

C = TypeVar("C")

CONFIG_FILE = "config.yaml"
INFO_FILE = "run_info.json"
LOCK_FILE = ".lock"
CHECKPOINT_SUFFIX = ".pt"
#: settings that never change what a run computes: free to differ on --resume
NOT_RESULT_KEYS = frozenset({
    "run.output_dir", "run.name", "run.device", "run.process_timeout_s", "data_root", "plots",
    "eval.num_workers", "eval.batch_size", "eval.cache_features", "eval.every",
    "model.cache_dir", "backbone.cache_dir", "data.split_dir",
})


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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that owns the run directory's records and lock."""
    return int(os.environ.get("RANK", "0")) == 0


# ----------------------------------------------------------------------------- records
def make_run_dir(output_dir: str | Path, name: str | None, job: str) -> Path:
    """Create ``output_dir/name`` (a fresh ``<job>-<timestamp>`` when ``name`` is None).

    Low-level: jobs go through :func:`new_run_dir` + :func:`open_run`, which refuse to reuse a
    folder that holds another run.
    """
    run_dir = Path(output_dir) / (name or default_run_name(output_dir, job))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def default_run_name(output_dir: str | Path, job: str) -> str:
    """``<job>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3`` ... when that folder already exists."""
    base = f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, k = base, 1
    while (Path(output_dir) / name).exists():
        k += 1
        name = f"{base}-{k}"
    return name


def record_run(run_dir: str | Path, cfg: Any, job: str, argv: list[str] | None = None,
               status: str | None = None) -> dict[str, Any]:
    """Write ``config.yaml`` (fully resolved) and ``run_info.json`` (version, commit, command, host)."""
    run_dir = Path(run_dir)
    resolved = to_dict(cfg)
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False))
    import torch

    info = {
        "job": job,
        "backmix_vlm_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "command": argv,
        "host": socket.gethostname(),
        "started": _now(),
    }
    precision = getattr(getattr(cfg, "run", None), "precision_record", None)
    if precision is not None:  # auto and what it resolved to on this device (runtime.resolve_run_precision)
        info["precision"] = precision
    if status is not None:
        info["status"] = status
    write_json(run_dir / INFO_FILE, info)
    return info


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``run_info.json`` as a dict ({} when missing or unreadable)."""
    path = Path(run_dir) / INFO_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / INFO_FILE).is_file() or (path / CONFIG_FILE).is_file()


def run_status(run_dir: str | Path) -> str | None:
    """``finished`` | ``running`` | ``interrupted`` | ``failed`` | ``unknown``; None if not a run.

    ``running`` with a lock whose process is gone (or no lock) reads as ``interrupted``.  A run
    without a recorded status counts as finished when it has ``results.json``.
    """
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        return None
    info = read_run_info(run_dir)
    status = info.get("status")
    if status is None:
        return "finished" if (run_dir / "results.json").is_file() else "unknown"
    if status == "running":
        lock = RunLock(run_dir).holder()
        if lock is None or lock_is_stale(lock):
            return "interrupted"
    return str(status)


def _update_info(run_dir: Path, **changes: Any) -> None:
    info = read_run_info(run_dir)
    info.update(changes)
    write_json(run_dir / INFO_FILE, info)


# ----------------------------------------------------------------------------- lock
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def lock_is_stale(lock: dict[str, Any]) -> bool:
    """True when the lock's process is known to be gone (same host, PID not running)."""
    if lock.get("host") != socket.gethostname():
        return False  # cannot check another machine's processes
    try:
        return not pid_alive(int(lock.get("pid", -1)))
    except (TypeError, ValueError):
        return True


class RunLock:
    """``<run_dir>/.lock``: PID, host, start time and command of the process writing the run."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": None, "host": None, "unreadable": True}
        return data if isinstance(data, dict) else {"pid": None, "host": None, "unreadable": True}

    def acquire(self, command: list[str] | None = None) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "command": command}
        payload = json.dumps(me).encode()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                other = self.holder()
                if other is None:
                    continue  # released meanwhile: try again
                if other.get("pid") == me["pid"] and other.get("host") == me["host"]:
                    raise RunDirError(f"{self.path.parent}: this process already writes this run")
                if other.get("unreadable") or lock_is_stale(other):
                    what = ("an unreadable lock" if other.get("unreadable") else
                            f"a stale lock: PID {other.get('pid')} on {other.get('host')} (since {other.get('since')}) "
                            "is no longer running")
                    _print_note(f"note: {self.path.parent}: taking over {what}")  # once (no warning as well)
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                where = ("on this host" if other.get("host") == me["host"] else f"on host {other.get('host')}")
                hint = ("" if other.get("host") == me["host"] else
                        f"; if that process is gone, delete {self.path} and retry")
                raise RunDirError(
                    f"run directory {self.path.parent} is being written by another process (PID {other.get('pid')} "
                    f"{where}, since {other.get('since')}: {' '.join(other.get('command') or []) or '?'}); "
                    f"wait for it to finish or pass a fresh run.name=<name>{hint}")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(payload)
            except BaseException:  # e.g. a full disk: no 0-byte lock may stay behind
                self.path.unlink(missing_ok=True)
                raise
            self.held = True
            return self
        raise RunDirError(f"{self.path}: could not take the run lock (it keeps changing); retry")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self.holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def _print_note(text: str) -> None:
    print(text, file=sys.stderr)


# ----------------------------------------------------------------------------- planning a run
@dataclass
class RunPlan:
    """Where a job will write, decided (and checked) before anything is created."""

    job: str
    run_dir: Path
    resume: bool = False
    overwrite: bool = False
    argv: list[str] | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # resume: key -> (saved, now)
    applied: dict[str, Any] = field(default_factory=dict)  # resume: what the job put into restored state (was / now)


def describe_existing(run_dir: Path) -> str:
    info = read_run_info(run_dir)
    status = run_status(run_dir) or "unknown"
    job = info.get("job", "")
    started = f", started {info['started']}" if info.get("started") else ""
    return f"a {status} {job + ' ' if job else ''}run{started}"


def new_run_dir(job: str, output_dir: str | Path, name: str | None, *, overwrite: bool = False,
                can_resume: bool = True, argv: list[str] | None = None) -> RunPlan:
    """Plan a fresh run into ``output_dir/name``; refuse when that folder already holds a run.

    Nothing is created here (see :func:`open_run`).  An empty existing folder is fine; a
    folder that holds a run needs ``overwrite``; any other non-empty folder is refused.
    """
    if name is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("multi-process runs need run.name (every process must write to the same folder)")
        name = default_run_name(output_dir, job)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"run.name: {name!r} is not a usable folder name")
    run_dir = Path(output_dir) / name
    if is_main_process():
        check_new_run_dir(run_dir, job, overwrite=overwrite, can_resume=can_resume)
        for old in leftover_asides(run_dir):
            _print_note(f"note: {old} holds a run that an interrupted --overwrite of {run_dir} was replacing; "
                        f"to keep it, move it back (mv '{old}' '{run_dir}') or under another name; else delete it")
    return RunPlan(job, run_dir, resume=False, overwrite=overwrite, argv=argv)


def check_new_run_dir(run_dir: Path, job: str, *, overwrite: bool = False, can_resume: bool = True) -> None:
    """RunDirError unless ``run_dir`` is missing, empty, or (with ``overwrite``) a run folder."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a folder; pass another run.name=<name>")
    entries = [p for p in run_dir.iterdir() if p.name != LOCK_FILE]
    if not entries and not (run_dir / LOCK_FILE).exists():
        return
    if not is_run_dir(run_dir):
        if not entries:
            return  # only a lock: open_run's lock check decides
        raise RunDirError(f"{run_dir} exists and is not a run directory (no {INFO_FILE}); not writing into it. "
                          "Pass another run.name=<name> or run.output_dir=<folder>")
    holder = RunLock(run_dir).holder()
    mine = holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
    if holder is not None and not mine and not lock_is_stale(holder) and not holder.get("unreadable"):
        raise RunDirError(f"run directory {run_dir} is being written by another process (PID {holder.get('pid')} "
                          f"on {holder.get('host')}, since {holder.get('since')}); pass a fresh run.name=<name>")
    if overwrite:
        return
    resume = "To continue it: add --resume. " if can_resume else ""
    raise RunDirError(f"run directory {run_dir} already holds {describe_existing(run_dir)}; refusing to overwrite "
                      f"it. {resume}For a new run: pass a fresh run.name=<name>. To replace it (its files are "
                      "deleted): add --overwrite")


def find_resume_dir(job: str, config: str | Path | None, overrides: list[str]) -> Path:
    """The run folder ``--resume`` means: a run directory given directly, or the YAML's
    ``run.output_dir`` / ``run.name`` (after overrides).  It must hold a run of ``job``."""
    from ..config import apply_overrides

    if config is not None and Path(config).is_dir():
        run_dir = Path(config)
    else:
        raw = apply_overrides(load_yaml(config) if config is not None else {}, list(overrides))
        run = raw.get("run") or {}
        if not isinstance(run, dict) or not run.get("name"):
            raise ConfigError("--resume needs the run's name: pass run.name=<folder under run.output_dir>, or give "
                              "the run directory instead of the YAML file")
        run_dir = Path(str(run.get("output_dir") or "runs")) / str(run["name"])
    if not (run_dir / CONFIG_FILE).is_file():
        what = "does not exist" if not run_dir.exists() else f"holds no {CONFIG_FILE}"
        raise RunDirError(f"--resume: there is no run to resume at {run_dir} (the folder {what}); "
                          "drop --resume to start it, or check run.name / run.output_dir")
    other = read_run_info(run_dir).get("job")
    if other and other != job:
        raise RunDirError(f"--resume: {run_dir} holds a {other} run, not a {job} run; resume it with "
                          f"backmix-vlm {other} {run_dir} --resume")
    return run_dir


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "l": [{"x": 2}]}`` → ``{"a.b": 1, "l[0].x": 2}`` (empty containers kept)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict) and data:
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, (list, tuple)) and data and any(isinstance(v, (dict, list)) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}[{i}]"))
        out[f"{prefix}#len"] = len(data)
    else:
        out[prefix] = data
    return out


def config_differences(before: Any, after: Any) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (before, after) for every resolved setting that differs."""
    a, b = flatten(to_dict(before)), flatten(to_dict(after))
    _missing = "<unset>"
    return {k: (a.get(k, _missing), b.get(k, _missing)) for k in sorted(set(a) | set(b))
            if a.get(k, _missing) != b.get(k, _missing)}


def result_affecting(changes: dict[str, tuple[Any, Any]], data_root: tuple[Any, Any] | None = None
                     ) -> dict[str, tuple[Any, Any]]:
    """Drop the keys in :data:`NOT_RESULT_KEYS` (and data roots moved along with ``data_root``)."""
    out = {}
    for key, (old, new) in changes.items():
        base = key.split("[")[0].split("#")[0]
        if key in NOT_RESULT_KEYS or base in NOT_RESULT_KEYS:
            continue
        if data_root is not None and key.endswith("root") and (old, new) == data_root:
            continue
        out[key] = (old, new)
    return out


def format_changes(changes: dict[str, tuple[Any, Any]], labels: tuple[str, str] = ("saved", "now")) -> str:
    return "; ".join(f"{k}: {labels[0]} {old!r}, {labels[1]} {new!r}" for k, (old, new) in changes.items())


def resume_config(job: str, run_dir: Path, overrides: list[str], build: Callable[[dict[str, Any]], C], *,
                  allow_changes: bool = False, config: str | Path | None = None,
                  argv: list[str] | None = None) -> tuple[C, RunPlan]:
    """The config ``--resume`` continues with: the run's saved ``config.yaml`` + ``overrides``.

    ``build(mapping) -> config`` is the job's loader.  Overrides that change a setting which
    affects results (anything but :data:`NOT_RESULT_KEYS`) raise a ConfigError listing them,
    unless ``allow_changes``.  When ``config`` is a YAML file that now differs from the saved
    config, a note lists the differences (the saved config wins).
    """
    saved_path = run_dir / CONFIG_FILE
    saved_raw = load_yaml(saved_path)
    # locating keys only say where the run is: they may differ from what was saved
    overrides = [o for o in overrides if o.split("=", 1)[0].strip() not in ("run.name", "run.output_dir")]
    saved = build_with_overrides(build, saved_raw, [], str(saved_path))
    raw = move_data_root(copy.deepcopy(saved_raw), overrides)
    new_root = data_root_override(overrides)
    old_root = saved_raw.get("data_root")
    cfg = build_with_overrides(build, raw, overrides, f"{saved_path} + overrides")
    changes = result_affecting(config_differences(saved, cfg),
                               (old_root, new_root) if new_root is not None else None)
    if changes and not allow_changes:
        raise ConfigError(
            f"--resume continues {run_dir} with its saved config; these overrides change settings that affect "
            f"the results: {format_changes(changes)}. Add --allow-changes to resume with them anyway (recorded in "
            f"{INFO_FILE}), or start a new run with a fresh run.name=<name> (other scores / OOD sets on the "
            "trained weights: backmix-vlm eval)")
    if config is not None and Path(config).is_file():
        try:
            from_file = build_with_overrides(build, load_yaml(config), overrides, str(config))
        except ConfigError:
            from_file = None
        if from_file is not None:
            differs = result_affecting(config_differences(cfg, from_file))
            if differs:
                _print_note(f"note: {config} differs from the run's saved config ({format_changes(differs, ('saved', 'file'))}); "
                            f"--resume continues with the saved config{' and the overrides' if overrides else ''}")
    return cfg, RunPlan(job, run_dir, resume=True, argv=argv, changes=changes)


def plan_from_args(job: str, args: Any, *, build: Callable[[dict[str, Any]], C], can_resume: bool = True
                   ) -> tuple[C, RunPlan]:
    """The config and run folder a job's command line asks for, checked, nothing created yet.

    ``args``: ``config`` (YAML file; with ``--resume`` also a run directory), ``overrides``,
    ``resume``, ``overwrite``, ``allow_changes``, ``argv``.  ``build(mapping) -> config`` is the
    job's loader (strict keys, ranges, every variant).
    """
    overrides = list(getattr(args, "overrides", None) or [])
    argv = getattr(args, "argv", None)
    config = getattr(args, "config", None)
    resume = bool(getattr(args, "resume", False)) and can_resume
    if resume:
        if getattr(args, "overwrite", False):
            raise ConfigError("--resume continues a run and --overwrite replaces it: pass only one of them")
        run_dir = find_resume_dir(job, config, overrides)
        cfg, plan = resume_config(job, run_dir, overrides, build, allow_changes=bool(getattr(args, "allow_changes", False)),
                                  config=config, argv=argv)
        resolve_run_precision(cfg.run)  # type: ignore[attr-defined]  # the saved name (auto only if overridden)
        return cfg, plan
    if getattr(args, "allow_changes", False):
        raise ConfigError("--allow-changes only applies to --resume")
    if config is not None and Path(config).is_dir():
        hint = f" (or add --resume to continue the run in {config})" if is_run_dir(config) and can_resume else ""
        raise ConfigError(f"{config} is a folder; give a YAML config file{hint}")
    cfg = build_with_overrides(build, load_yaml(config) if config is not None else {}, overrides,
                               str(config) if config is not None else "")
    run = cfg.run  # type: ignore[attr-defined]
    resolve_run_precision(run)  # run.precision: auto -> what this device computes natively (config.yaml keeps it)
    plan = new_run_dir(job, run.output_dir, run.name, overwrite=bool(getattr(args, "overwrite", False)),
                       can_resume=can_resume, argv=argv)
    return cfg, plan


# ----------------------------------------------------------------------------- the run itself
def _has_checkpoint(run_dir: Path, newer_than: float | None = None) -> bool:
    for p in run_dir.rglob(f"*{CHECKPOINT_SUFFIX}"):
        try:
            if newer_than is None or p.stat().st_mtime >= newer_than:
                return True
        except OSError:
            continue
    return False


def _remove_empty(created: list[Path]) -> None:
    """rmdir the folders in ``created`` (deepest first) that are still empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


def _remove_fresh(run_dir: Path, created: list[Path]) -> None:
    """Remove what a failed fresh run left: its folder (or, if the folder existed, its contents)
    and the empty parent folders it created."""
    if run_dir in created:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif run_dir.is_dir():
        for entry in run_dir.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for parent in created:  # folders this run created above the run directory, deepest first
        if parent == run_dir:
            continue
        try:
            parent.rmdir()
        except OSError:
            break


@contextmanager
def open_run(plan: RunPlan, cfg: Any, *, sub_configs: dict[str, Any] | None = None) -> Iterator[Path]:
    """Create / lock the run directory, record the run, and settle its records on exit.

    Fresh run: the folder is created (with ``--overwrite`` the old run is renamed to a hidden sibling
    first and deleted only once the new run has a checkpoint; a failure before that puts it back),
    locked, and ``config.yaml`` / ``run_info.json`` written with status ``running``.  On success
    the status becomes ``finished``; on failure a run without any checkpoint is removed again
    (no stub folders), one with checkpoints is marked ``failed`` / ``interrupted``.

    Resume: the folder is locked; its records change only when this command trained (a
    checkpoint newer than its start) or finished: ``run_info.json`` gets a ``resumed`` entry and
    with allowed changes ``config.yaml`` (and each ``sub_configs`` folder's) becomes the new config.

    Only the main process (``RANK`` 0) touches records and the lock.
    """
    run_dir = plan.run_dir
    if not is_main_process():
        yield run_dir
        return
    start = time.time()
    started = _now()
    lock = RunLock(run_dir)
    created: list[Path] = []
    aside: Path | None = None  # --overwrite: the old run, kept whole until the new one has a checkpoint
    if plan.resume:
        lock.acquire(plan.argv)
        remove_leftover_temps(run_dir)
    else:
        created = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
        try:  # another process may have claimed the folder since the plan was checked: then touch nothing
            lock.acquire(plan.argv)
            check_new_run_dir(run_dir, plan.job, overwrite=plan.overwrite)  # again, now under the lock
            if plan.overwrite and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
                aside = _move_aside(run_dir, lock, plan.argv)
                created = [run_dir]
        except BaseException:
            lock.release()
            _remove_empty(created)
            raise
        try:
            record_run(run_dir, cfg, plan.job, plan.argv, status="running")
        except BaseException:
            _remove_fresh(run_dir, created)  # ours (locked, checked): the lock file goes with it
            lock.release()
            _restore_aside(aside, run_dir)
            raise
    try:
        yield run_dir
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        if _has_checkpoint(run_dir) and plan.job in RESUMABLE_JOBS:
            _add_resume_hint(e, plan)
        if plan.resume:
            if _has_checkpoint(run_dir, newer_than=start):
                _best_effort(_settle_resume, plan, cfg, sub_configs, started, status)
        elif not _has_checkpoint(run_dir):
            _remove_fresh(run_dir, created)  # nothing worth keeping: no stub folder (the lock goes with it)
            lock.release()
            _restore_aside(aside, run_dir)  # --overwrite: the old run is back as it was
            raise
        else:
            _best_effort(_update_info, run_dir, status=status, ended=_now(),
                         error=f"{type(e).__name__}: {str(e)[:300]}")
            _drop_aside(aside)  # the new run has a checkpoint: the replacement is done
        lock.release()
        raise
    if plan.resume:
        _settle_resume(plan, cfg, sub_configs, started, "finished")
    else:
        _update_info(run_dir, status="finished", finished=_now())
        _drop_aside(aside)
    lock.release()


ASIDE_MARK = ".replaced-"
RESUMABLE_JOBS = ("train", "fewshot")


def _add_resume_hint(error: BaseException, plan: RunPlan) -> None:
    """Tell the user (``error.resume_hint``, printed by the CLI) that the run is kept and how to continue it."""
    from ..errors import DivergedError

    change = " optim.lr=<lower> --allow-changes" if isinstance(error, DivergedError) else ""
    try:
        error.resume_hint = (f"the run is kept at {plan.run_dir} with its last checkpoint; continue it with: "  # type: ignore[attr-defined]
                             f"backmix-vlm {plan.job} {plan.run_dir} --resume{change}")
    except AttributeError:  # an exception type without a __dict__
        pass


def _move_aside(run_dir: Path, lock: RunLock, command: list[str] | None) -> Path:
    """Rename the run in ``run_dir`` (locked by ``lock``) to a hidden sibling and give ``lock`` a fresh,
    empty ``run_dir``: ``--overwrite`` keeps the old run whole until the new one has a checkpoint."""
    aside = run_dir.with_name(f".{run_dir.name}{ASIDE_MARK}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.rename(run_dir, aside)
    lock.held = False
    try:
        (aside / LOCK_FILE).unlink()
    except FileNotFoundError:
        pass
    try:
        run_dir.mkdir()
        lock.acquire(command)
    except BaseException:
        _restore_aside(aside, run_dir)
        raise
    return aside


def _restore_aside(aside: Path | None, run_dir: Path) -> None:
    """Put the old run back where it was (the new run's folder is already gone)."""
    if aside is None:
        return
    try:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        os.rename(aside, run_dir)
    except OSError as e:
        _print_note(f"note: the run that --overwrite was replacing is kept at {aside} (could not move it back to "
                    f"{run_dir}: {e.strerror or e}); move it back by hand")


def _drop_aside(aside: Path | None) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def leftover_asides(run_dir: Path) -> list[Path]:
    """Old runs that an interrupted ``--overwrite`` of ``run_dir`` had set aside (hidden siblings)."""
    try:
        return sorted(run_dir.parent.glob(f".{run_dir.name}{ASIDE_MARK}*"))
    except OSError:
        return []


def _best_effort(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Update records on the way out of a failure; a full disk / read-only folder must not hide the
    original error (the checkpoint is what makes the run resumable)."""
    try:
        fn(*args, **kwargs)
    except OSError as e:
        _print_note(f"note: could not update the run's records ({e.strerror or e}: {e.filename or ''})")


def _settle_resume(plan: RunPlan, cfg: Any, sub_configs: dict[str, Any] | None, started: str, status: str) -> None:
    run_dir = plan.run_dir
    info = read_run_info(run_dir)
    entry = {"command": plan.argv, "started": started, "ended": _now(), "status": status, "host": socket.gethostname()}
    if plan.changes:
        entry["changes"] = {k: {"was": old, "now": new} for k, (old, new) in plan.changes.items()}
    if plan.applied:  # e.g. the optimizer's restored LR / weight decay replaced by the changed config's
        entry["applied"] = plan.applied
        atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        for name, sub in (sub_configs or {}).items():
            if (run_dir / name / CONFIG_FILE).is_file():
                atomic_write_text(run_dir / name / CONFIG_FILE, yaml.safe_dump(to_dict(sub), sort_keys=False))
    info["resumed"] = [*info.get("resumed", []), entry]
    info["status"] = status
    if status == "finished":
        info["finished"] = entry["ended"]
    write_json(run_dir / INFO_FILE, info)


@contextmanager
def fresh_output_dir(path: str | Path) -> Iterator[Path]:
    """A new output folder (e.g. ``eval-<timestamp>``) that is removed again if the command fails."""
    path = Path(path)
    created = [p for p in [path, *path.parents] if not p.exists()]
    try:
        yield path
    except BaseException:
        if created:
            _remove_fresh(path, created)
        raise


def unique_subdir(parent: str | Path, stem: str) -> Path:
    """``parent/stem-<timestamp>`` that does not exist yet (``-2``, ``-3`` ... on a clash)."""
    return Path(parent) / default_run_name(parent, stem)
