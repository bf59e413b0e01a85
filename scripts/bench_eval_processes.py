"""Wall time of an evaluation job (zeroshot / ood / eval) on 1 vs N processes, and their equality.

Runs the job alternately as one process and under ``torchrun --nproc_per_node N`` (gloo on CPU,
NCCL on GPUs), each with ``--threads`` intra-op threads per process, and checks that the N-process
``results.json`` / ``scores.safetensors`` equal the one-process files.  Prints one Markdown row
per run with the date, host and load average (on a shared machine the load changes the numbers).

    BACKMIX_DATA=/work/data python scripts/bench_eval_processes.py zeroshot \\
        configs/zeroshot/tiny_real_shared.yaml --nproc 2 --repeat 2 -- run.eval_workers=1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from backmix_vlm.runtime import machine_line  # noqa: E402


def _run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _same(a: Path, b: Path) -> bool:
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    sa, sb = load_file(str(a / "scores.safetensors")), load_file(str(b / "scores.safetensors"))
    return ra == rb and sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def main() -> None:
    print(machine_line(), flush=True)  # CPU model, kernel flags, native bf16 (each row names its precision)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=["zeroshot", "ood"])
    p.add_argument("config")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    args, extra = p.parse_known_args()  # overrides (key=value) may follow the options
    args.overrides += [e for e in extra if e != "--"]
    out = Path(tempfile.mkdtemp(prefix="bench_eval_processes_"))
    base = [args.job, args.config, f"run.output_dir={out}", "eval.cache_features=false", *args.overrides]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"{args.threads} thread(s) per process: {' '.join(base[:2] + args.overrides)}")
    print("| run | processes | wall (s) | load avg (1 min) before | equal to 1 process |\n|---|---:|---:|---:|---|")
    for r in range(args.repeat):
        for n in (1, args.nproc):
            name = f"p{n}_{r}"
            launch = [sys.executable, "-m", "backmix_vlm.cli"] if n == 1 else \
                ["torchrun", "--standalone", f"--nproc_per_node={n}", "-m", "backmix_vlm.cli"]
            load = os.getloadavg()[0]
            wall = _run([*launch, *base, f"run.name={name}"], args.threads)
            same = "—" if n == 1 else str(_same(out / f"p1_{r}", out / name))
            print(f"| {r + 1} | {n} | {wall:.1f} | {load:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
