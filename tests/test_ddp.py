"""Two-process CPU DDP (gloo, through Accelerate's MULTI_CPU) with the real Trainer.

Checks that the mask bank (updated by a collective gather) and the weights stay identical
on both processes, that every sample's bank row was updated (rows seen by the OTHER rank
too), and that an interrupted + resumed DDP run equals the uninterrupted one bit for bit.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_resume import make_trainer

    # device views (the default path): crop / flip drawn per rank, coverage-weighted bank update gathered
    full = make_trainer(Path(tmp) / "full", device_views=True)
    assert full.world == WORLD and full.rank == rank
    full.fit()
    make_trainer(Path(tmp) / "split", device_views=True).fit(stop_after=1)
    resumed = make_trainer(Path(tmp) / "split", model_seed=5, device_views=True)
    resumed.fit(resume=True)
    for name, t in (("full", full), ("resumed", resumed)):
        model = t.accelerator.unwrap_model(t.model)
        torch.save({"bank": t.bank.bank.clone(), "model": model.state_dict(), "history": t.history},
                   Path(tmp) / f"{name}{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes (gloo): ~10-15 s
def test_ddp_two_processes_keep_bank_and_weights_identical(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    out = {f.stem: torch.load(f) for f in tmp_path.glob("*.pt")}
    for name in ("full", "resumed"):
        a, b = out[f"{name}0"], out[f"{name}1"]
        assert torch.equal(a["bank"], b["bank"])
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
    full = out["full0"]
    # every one of the 40 rows moved away from the 0.5 init: each rank applied the other's maps
    assert (full["bank"] != 0.5).flatten(1).any(1).all()
    # resumed DDP run == uninterrupted DDP run
    for key in full["model"]:
        assert torch.equal(full["model"][key], out["resumed0"]["model"][key]), key
    assert torch.equal(full["bank"], out["resumed0"]["bank"])
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    assert strip(full["history"]) == strip(out["resumed0"]["history"])
    assert len(full["history"]) == 2 and "acc" in full["history"][-1]
