"""Where and how computations run: device names, precision names + autocast, the network probe.

One definition of each, used by every job:

* ``run.device`` (``auto | cpu | cuda | cuda:N``) → :func:`resolve_device`.
* Two different precision settings, with two different name sets on purpose:
  ``run.precision`` is **autocast** (``AUTOCAST_PRECISIONS``: ``auto | no | bf16 | fp16``; weights
  stay fp32) → :func:`autocast`; ``auto`` is resolved once per run by :func:`resolve_run_precision`
  (bf16 where the device computes it natively, fp16 on older CUDA GPUs, else fp32); ``model.precision`` of the zero-shot job is the **weight dtype** of a
  frozen CLIP (``WEIGHT_PRECISIONS``: ``fp32 | fp16 | bf16``).  Both map a name to a torch dtype
  with :func:`low_precision_dtype` (``no`` / ``fp32`` → None, i.e. float32).
* Processes (``torchrun`` / ``accelerate launch``): :func:`distributed_active`,
  :func:`on_main_process` (run a step on the main process only, its value or error reaching every
  process), :func:`broadcast_from_main` and :func:`process_group_errors` (``run.process_timeout_s``:
  a collective that waited longer, or whose peer stopped, becomes one clear error instead of a gloo /
  NCCL traceback).
* :func:`host_reachable` / :func:`hub_reachable`: a TCP probe of a few seconds, so offline
  machines fail fast with advice instead of minutes of download retries.  ``BACKMIX_VLM_OFFLINE=1``
  skips the probe and behaves as offline.
* :func:`progress`: a tqdm bar on a terminal, a few plain lines in a log file.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .errors import BackmixError, ConfigError, ProcessGroupError

T = TypeVar("T")

AUTOCAST_PRECISIONS = ("auto", "no", "bf16", "fp16")
WEIGHT_PRECISIONS = ("fp32", "fp16", "bf16")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
OFFLINE_ENV = "BACKMIX_VLM_OFFLINE"   # "1": skip network probes and behave as offline
HUB_HOST = ("huggingface.co", 443)


# ----------------------------------------------------------------------------- devices
def check_device_name(device: Any, where: str = "run.device") -> str:
    """``device`` as a string if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (no GPU check).

    ``cpu:N`` is accepted too: it is the device Accelerate gives each process of a multi-process
    CPU run, and it reaches the model builders as ``accelerator.device``.
    """
    name = str(device)
    if name in ("auto", "cpu", "cuda"):
        return name
    head, sep, index = name.partition(":")
    if sep and head in ("cpu", "cuda") and index.isdigit():
        return name
    raise ConfigError(f"{where}: {name!r} is not accepted; use {DEVICE_CHOICES}")


def resolve_device(device: Any, where: str = "run.device") -> Any:
    """``auto`` → CUDA when visible, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given.

    Asking for CUDA on a machine without a visible GPU is a ConfigError naming ``where``.
    """
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    name = check_device_name(device, where)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{where}: {name!r} but no CUDA GPU is visible; use {where}=cpu or auto")
    return dev


# ----------------------------------------------------------------------------- precision
def check_autocast_precision(precision: Any, where: str = "run.precision") -> str:
    if precision not in AUTOCAST_PRECISIONS:
        raise ConfigError(f"{where}: {precision!r} is not accepted; choose one of {', '.join(AUTOCAST_PRECISIONS)} "
                          "(autocast; the weights stay float32)")
    return str(precision)


def low_precision_dtype(precision: str | None) -> Any:
    """``bf16`` → ``torch.bfloat16``, ``fp16`` → ``torch.float16``; ``no`` / ``fp32`` / None → None (float32).

    The one name → dtype map, for autocast and for frozen weights alike.
    """
    import torch

    if precision in (None, "no", "fp32"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto":
        raise ConfigError("precision 'auto' has no dtype of its own: resolve it for the device first "
                          "(runtime.resolve_precision / resolve_run_precision)")
    raise ConfigError(f"precision {precision!r} is not accepted; choose no, fp32, bf16 or fp16")


#: why explicit bf16 on a CPU without native bf16 is a bad idea (measured; docs/benchmarks_speed.md)
BF16_EMULATED = ("bf16 convolutions / matmuls are emulated there: on an AVX2-only AMD EPYC a bf16 CNN round at "
                 "batch 256 took 84.6 s against 26-29 s for an fp32 round at batch 1,024, ~12x slower per image")
_warned: set[str] = set()


def native_bf16(device: Any) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and the evidence (recorded in run_info.json).

    CUDA: compute capability >= 8.0 (Ampere and newer; older GPUs emulate bf16).  CPU: oneDNN's
    check (:func:`backmix_vlm.compat.cpu_native_bf16`).  Other devices: no.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        name = torch.cuda.get_device_name(dev)
        return major >= 8, f"{name}, compute capability {major}.{minor} ({'>=' if major >= 8 else '<'} 8.0 for bf16)"
    if dev.type == "cpu":
        from .compat import cpu_native_bf16

        native = cpu_native_bf16()
        return native, f"{cpu_name()}: oneDNN reports {'native' if native else 'no native'} bf16"
    return False, f"{dev.type}: bf16 autocast not used"


def resolve_precision(precision: str, device: Any, where: str = "run.precision") -> tuple[str, str]:
    """The autocast precision a run computes in, and why.

    ``auto``: ``bf16`` where ``device`` computes it natively, ``fp16`` (with a gradient scaler when
    training) on a CUDA GPU without bf16, ``no`` (float32) otherwise.  An explicit name is kept;
    ``bf16`` on a CPU without native bf16 warns once per process with the measured reason.
    """
    import torch

    check_autocast_precision(precision, where)
    dev = torch.device(device)
    if precision == "auto":
        native, evidence = native_bf16(dev)
        if native:
            return "bf16", f"auto: {evidence}"
        if dev.type == "cuda":
            return "fp16", f"auto: {evidence}; fp16 autocast (training: with a gradient scaler)"
        return "no", f"auto: {evidence}; float32"
    if precision == "bf16" and dev.type == "cpu":
        native, evidence = native_bf16(dev)
        if not native:
            _warn_once(f"warning: {where}: bf16 on a CPU without native bf16 ({evidence}); {BF16_EMULATED}. "
                       f"Use {where}=auto (float32 here) or {where}=no")
            return "bf16", f"given; {evidence}"
    return str(precision), "given"


def resolve_run_precision(run: Any) -> dict[str, str]:
    """Resolve ``run.precision`` (a :class:`~backmix_vlm.config.RunConfig`) in place on ``run.device``
    and return the record kept in run_info.json (``requested``, ``resolved``, ``reason``).

    Runs save the resolved name in config.yaml, so ``--resume`` / ``eval`` compute in the precision
    the run started with, on any machine.  A second call returns the first record.
    """
    record = getattr(run, "precision_record", None)
    if record is not None:
        return record
    device = resolve_device(run.device)
    name, reason = resolve_precision(run.precision, device)
    record = {"requested": str(run.precision), "resolved": name, "reason": reason, "device": str(device)}
    run.precision = name
    run.precision_record = record  # an attribute, not a field: config.yaml holds the resolved name only
    return record


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    import platform

    info = _proc_cpuinfo()
    return info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"


#: the CPU flags that decide which kernels run (vector width, native bf16 / fp16, AMX)
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                "amx_bf16", "neon", "asimd", "bf16", "sve")


def cpu_flags() -> list[str]:
    """The :data:`KERNEL_FLAGS` this CPU reports (empty where ``/proc/cpuinfo`` is missing)."""
    info = _proc_cpuinfo()
    have = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in KERNEL_FLAGS if f in have]


def _proc_cpuinfo() -> dict[str, str]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if out:
                break  # the first processor's block is enough
            continue
        out.setdefault(key.strip(), value.strip())
    return out


def machine_line(precision: str | None = None, device: Any = "cpu") -> str:
    """One line for benchmark output: CPU model and kernel flags, torch's CPU capability and threads,
    native bf16, and (given) the precision that ran."""
    import torch

    parts = [f"cpu: {cpu_name()}", f"flags: {' '.join(cpu_flags()) or '?'}",
             f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels, "
             f"{torch.get_num_threads()} threads)",
             f"native bf16: {'yes' if native_bf16('cpu')[0] else 'no'}"]
    dev = torch.device(device)
    if dev.type == "cuda":
        parts.append(f"gpu: {torch.cuda.get_device_name(dev)}")
    if precision is not None:
        parts.append(f"precision: {precision}")
    return "; ".join(parts)


def _warn_once(text: str) -> None:
    if text in _warned:
        return
    _warned.add(text)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(text, file=sys.stderr, flush=True)


def autocast(device: Any, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` bf16 / fp16 on ``device``'s type; a no-op for ``no``
    (``auto``: as :func:`resolve_precision` decides for ``device``)."""
    import torch

    check_autocast_precision(precision, "precision")
    if precision == "auto":
        precision = resolve_precision(precision, device)[0]
    dtype = low_precision_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# ----------------------------------------------------------------------------- processes
def distributed_active() -> bool:
    """True inside a process group of more than one process (``torchrun`` / ``accelerate launch``)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_from_main(value: T) -> T:
    """The main process's ``value`` on every process (picklable objects; a no-op in one process)."""
    if not distributed_active():
        return value
    import torch.distributed as dist

    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main_process(fn: Callable[[], T]) -> T:
    """``fn()`` run by the main process only; every process returns its value.

    For steps that must happen once (writing a shared file, reading what only the main process
    decides).  An error raised by ``fn`` on the main process is raised on every process, so the
    others fail with the same message instead of waiting for a value that never comes.
    """
    if not distributed_active():
        return fn()
    import torch.distributed as dist

    outcome: tuple[str, Any] = ("value", None)
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            outcome = ("value", fn())
        except BaseException as e:  # noqa: BLE001 - re-raised below, on every process
            error = e
            outcome = ("error", (isinstance(e, BackmixError), f"{type(e).__name__}: {e}"))  # text pickles always
    kind, value = broadcast_from_main(outcome)
    if error is not None:
        raise error
    if kind == "error":
        user, text = value
        if user:  # the same one-line message as the main process's (the CLI prints the message only)
            raise BackmixError(text.partition(": ")[2])
        raise RuntimeError(f"on the main process: {text}")
    return value


def single_process_launch_warning(num_processes: int) -> str | None:
    """A warning when ``accelerate launch --cpu --num_processes N`` started this run as ONE process.

    Accelerate starts several CPU processes only through ``mpirun`` (``accelerate config``); without
    it the launcher sets ``MASTER_PORT`` for N processes and runs one, silently.
    """
    launched_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if num_processes == 1 and launched_cpu and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        return ("warning: `accelerate launch --cpu --num_processes N` runs ONE process (Accelerate starts "
                "several CPU processes only through mpirun); for N CPU processes use "
                "`torchrun --nproc_per_node N -m backmix_vlm.cli <job> ...`")
    return None


_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_GONE = re.compile(r"closed by peer|reset by peer|remote worker crash|communicator was aborted", re.IGNORECASE)


@contextlib.contextmanager
def process_group_errors(timeout_s: float, where: str = "run.process_timeout_s") -> Iterator[None]:
    """Turn a failed collective (gloo / NCCL traceback) of a multi-process run into one clear error.

    Every process waits at each collective (gradient all-reduce, mask-bank gather, the barrier
    after the main process's evaluation).  One that waited ``timeout_s`` seconds, or whose peer
    stopped, raises :class:`~backmix_vlm.errors.ProcessGroupError` saying which and what to do.
    """
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if not distributed_active() or not (_TIMED_OUT.search(text) or _PEER_GONE.search(text)):
            raise
        import torch.distributed as dist

        me = f"process {dist.get_rank()} of {dist.get_world_size()}"
        if _PEER_GONE.search(text):
            raise ProcessGroupError(f"{me}: another process of this run stopped (its own error is printed above "
                                    "or in its log); this one stops too") from e
        raise ProcessGroupError(
            f"{me} waited more than {where}={timeout_s:g} s for the others (one of them hangs, or the main "
            f"process's evaluation / checkpoint took longer); raise {where} or look at the other processes' "
            "output") from e


# ----------------------------------------------------------------------------- network
def offline_forced() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def host_reachable(host: str, port: int, timeout: float = 2.0) -> tuple[bool, str]:
    """(True, "") when ``host:port`` accepts a TCP connection within ``timeout`` s, else (False, why).

    Runs in a thread with a hard deadline, because name resolution ignores the socket timeout.
    """
    if offline_forced():
        return False, f"{OFFLINE_ENV} is set"
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            result.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 2.0)
    if not result:
        return False, "timed out"
    if result[0] is not None:
        return False, f"{type(result[0]).__name__}: {result[0]}"
    return True, ""


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when huggingface.co:443 answers within ``timeout`` seconds.

    Offline, huggingface_hub retries for minutes before giving up; this probe lets the loaders
    switch it to cache-only mode and fail in seconds instead.
    """
    return host_reachable(*HUB_HOST, timeout=timeout)[0]


def check_eval_workers(workers: Any, where: str = "run.eval_workers") -> None:
    """``workers`` must be ``"auto"`` or a non-negative int; a ConfigError naming ``where`` otherwise."""
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"{where}: {workers!r} is not accepted; expected 'auto' (one per torch thread on CPU), "
                          "0 or 1 (off) or a number of worker threads >= 2")


# ----------------------------------------------------------------------------- progress
def progress(items: Iterable[T], desc: str, *, lines: int = 10, stream: Any = None) -> Iterator[T]:
    """Iterate ``items`` showing progress: a tqdm bar when ``stream`` (stderr) is a terminal; otherwise
    (output to a file, a job log) a plain line every ~1/``lines`` of the batches and one when done, so a
    long evaluation is never silent."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, leave=False, file=stream)
        return
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    every = max(1, -(-total // lines)) if total else 100
    start, done = time.perf_counter(), 0
    for done, item in enumerate(items, 1):
        yield item
        if done % every == 0 and done != total:
            print(f"  {desc}: {done}/{total or '?'} batches ({time.perf_counter() - start:.0f} s)", file=stream,
                  flush=True)
    print(f"  {desc}: {done} batches in {time.perf_counter() - start:.1f} s", file=stream, flush=True)
