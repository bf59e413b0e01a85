"""``zeroshot``, ``ood`` and ``eval`` on two gloo processes equal one process, file for file.

Each job runs once in this process and once as two spawned processes (``RANK`` / ``WORLD_SIZE``
as ``torchrun`` sets them), all with one intra-op thread.  The per-sample scores
(``scores.safetensors``) and every metric (``results.json``) must be equal bit for bit, and only
rank 0 may write: every atomic write of each process is recorded.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.numpy import load_file

from backmix_vlm import cli

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]
ZS_ARGS = ["eval.scores=[mcm,glmcm,msp,energy,odin]", "eval.batch_size=8", "run.eval_workers=1"]
OOD_ARGS = ["eval.scores=[msp,energy,odin,mahalanobis,knn,vim,ash_s]", "eval.batch_size=16", "plots=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, jobs: list[list[str]], log: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from backmix_vlm import atomic

    torch.set_num_threads(1)
    written: list[str] = []
    real = atomic.atomic_write

    def recording(path, write):
        written.append(str(path))
        return real(path, write)

    atomic.atomic_write = recording
    codes = [cli.main(list(args)) for args in jobs]
    Path(f"{log}{rank}.json").write_text(json.dumps({"written": written, "codes": codes}))
    dist.destroy_process_group()


def _two_processes(tmp: Path, jobs: list[list[str]]) -> list[dict]:
    log = str(tmp / "writes")
    mp.start_processes(_worker, args=(_free_port(), jobs, log), nprocs=WORLD, start_method="spawn")
    return [json.loads(Path(f"{log}{r}.json").read_text()) for r in range(WORLD)]


def _same_results(one: Path, two: Path) -> None:
    a, b = json.loads((one / "results.json").read_text()), json.loads((two / "results.json").read_text())
    for key in ("train_time_s", "checkpoint"):
        a.pop(key, None), b.pop(key, None)
    assert a == b
    sa, sb = load_file(str(one / "scores.safetensors")), load_file(str(two / "scores.safetensors"))
    assert sa.keys() == sb.keys() and len(sa) > 3
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and ".lock" not in p.name}


@pytest.mark.slow  # two spawned processes: ~30 s
def test_zeroshot_ood_and_eval_on_two_processes_equal_one(tmp_path, tiny_train_config):
    zs = ["zeroshot", str(ROOT / "configs" / "zeroshot" / "tiny_demo.yaml"), *ZS_ARGS]
    ood = ["ood", str(ROOT / "configs" / "ood" / "tiny_demo.yaml"), *OOD_ARGS]
    probe = [*ood, "probe.enabled=true"]  # ODIN through a probe fit on the main process
    # a train run to re-evaluate (one process), with scores fit on the training set and ODIN
    assert cli.main(["train", str(tiny_train_config)]) == 0
    train_run = tmp_path / "runs" / "tiny"
    ev = ["eval", str(train_run), "eval.scores=[msp,odin,knn,mahalanobis]", "eval.score_params={knn: {k: 2}}",
          "eval.batch_size=4"]
    jobs = {"zs": zs, "ood": ood, "probe": probe}
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: a convolution's last bits depend on the thread count
    try:
        for name, args in jobs.items():
            assert cli.main([*args, f"run.output_dir={one}", f"run.name={name}"]) == 0
        assert cli.main(ev) == 0
    finally:
        torch.set_num_threads(threads)
    eval_one = sorted(train_run.glob("eval-*"))
    logs = _two_processes(tmp_path, [[*args, f"run.output_dir={two}", f"run.name={name}"]
                                     for name, args in jobs.items()] + [ev])
    assert [log["codes"] for log in logs] == [[0] * 4] * WORLD
    eval_two = sorted(set(train_run.glob("eval-*")) - set(eval_one))
    assert len(eval_one) == len(eval_two) == 1   # both processes wrote into one new eval folder
    for name in jobs:
        _same_results(one / name, two / name)
        assert _files(one / name) - {"run_info.json"} == _files(two / name) - {"run_info.json"}
    _same_results(eval_one[0], eval_two[0])
    # rank 0 wrote every result file; rank 1 wrote nothing
    assert logs[1]["written"] == []
    written = {Path(p) for p in logs[0]["written"]}
    for name in jobs:
        assert {two / name / "results.json", two / name / "scores.safetensors"} <= written
    assert {eval_two[0] / "results.json", eval_two[0] / "scores.safetensors"} <= written
