"""Two-process CPU DDP (gloo, through Accelerate's MULTI_CPU) with the real Trainer.

Checks that the mask bank (updated by a collective gather) and the weights stay identical
on both processes, that every sample's bank row was updated (rows seen by the OTHER rank
too), and that an interrupted + resumed DDP run equals the uninterrupted one bit for bit.
"""
from __future__ import annotations

import json
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


def _timeout_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    import time

    from test_resume import make_trainer

    from backmix_vlm.config import RunConfig
    from backmix_vlm.engine.trainer import build_accelerator
    from backmix_vlm.errors import ProcessGroupError
    from backmix_vlm.runtime import process_group_errors

    build_accelerator(RunConfig(device="cpu", process_timeout_s=2))  # the process group: 2 s per collective
    trainer = make_trainer(Path(tmp) / "run")
    trainer.evaluate = lambda model, epoch: time.sleep(6) or {}  # the main process evaluates for 6 s
    try:
        with process_group_errors(2):
            trainer.fit(stop_after=1)
        message = "finished"
    except ProcessGroupError as e:
        message = str(e)
    (Path(tmp) / f"message{rank}.txt").write_text(message)


@pytest.mark.slow  # two processes (gloo), 6 s of waiting
def test_process_timeout_fails_with_one_clear_message(tmp_path):
    """run.process_timeout_s reaches the process group: the process waiting for the main one's evaluation
    gives up after 2 s with a message naming the key; the main one then learns its peer stopped."""
    mp.start_processes(_timeout_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    waiting = (tmp_path / "message1.txt").read_text()
    assert waiting.startswith("process 1 of 2 waited more than run.process_timeout_s=2 s"), waiting
    main = (tmp_path / "message0.txt").read_text()
    assert main.startswith("process 0 of 2"), main


@pytest.mark.parametrize("n,world", [(19, 2), (20, 2), (7, 3), (10, 4), (3, 4)])
def test_sampler_padding_marks_exactly_the_repeats(n, world):
    """Dropping the flagged positions leaves every sample exactly once, as one process sees them."""
    from torch.utils.data import DistributedSampler

    from backmix_vlm.engine.trainer import sampler_padding

    kept = []
    for rank in range(world):
        order = list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3))
        pad = sampler_padding(rank, world, n, 0, len(order))
        assert not pad[: len(order) - 1].any()  # only a rank's last position can be padding
        kept += [i for i, p in zip(order, pad.tolist()) if not p]
        # a batch in the middle of the epoch gets the same flags as the whole epoch's slice
        assert torch.equal(sampler_padding(rank, world, n, 1, len(order) - 1), pad[1:])
    assert sorted(kept) == list(range(n))


def test_per_process_devices_and_timeout_key_are_checked():
    from backmix_vlm.config import RunConfig
    from backmix_vlm.errors import ConfigError
    from backmix_vlm.runtime import check_device_name, resolve_device

    assert resolve_device(torch.device("cpu", 0)) == torch.device("cpu", 0)  # Accelerate's per-process device
    assert check_device_name("cpu:1") == "cpu:1" and check_device_name("cuda:1") == "cuda:1"
    for bad in ("gpu", "cpu:x", "cuda:", "tpu:0"):
        with pytest.raises(ConfigError, match="run.device"):
            check_device_name(bad)
    RunConfig(process_timeout_s=60).validate()
    with pytest.raises(ConfigError, match=r"run.process_timeout_s: 0 is not accepted; expected a number >= 1"):
        RunConfig(process_timeout_s=0).validate()


def test_accelerate_cpu_launch_of_one_process_is_named(monkeypatch):
    """``accelerate launch --cpu --num_processes 2`` sets MASTER_PORT and starts one process: say so."""
    from backmix_vlm.runtime import single_process_launch_warning

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert "torchrun --nproc_per_node N" in single_process_launch_warning(1)
    assert single_process_launch_warning(2) is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / a real multi-process launch
    assert single_process_launch_warning(1) is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("MASTER_PORT")  # plain `accelerate launch --cpu` of one process
    assert single_process_launch_warning(1) is None


def test_one_gpu_index_is_refused_for_several_processes(monkeypatch):
    from backmix_vlm.config import RunConfig
    from backmix_vlm.engine.trainer import build_accelerator
    from backmix_vlm.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"run.device: 'cuda:1' names one GPU, but this run has 2 processes"):
        build_accelerator(RunConfig(device="cuda:1"))


def _main_process_worker(rank: int, port: int, tmp: str) -> None:
    import torch.distributed as dist

    from backmix_vlm.errors import BackmixError, DataError
    from backmix_vlm.runtime import on_main_process

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    calls = []
    value = on_main_process(lambda: calls.append(rank) or {"indices": [3, 1, 4]})

    def bad_split():
        raise DataError("few-shot split file s.json does not match this run")
    try:
        on_main_process(bad_split)
        error = None
    except BackmixError as e:
        error = f"{type(e).__name__}: {e}"
    (Path(tmp) / f"main{rank}.json").write_text(json.dumps({"value": value, "calls": calls, "error": error}))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes (gloo): ~5 s
def test_on_main_process_runs_once_and_shares_value_and_error(tmp_path):
    mp.start_processes(_main_process_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"main{r}.json").read_text()) for r in range(WORLD))
    assert r0["calls"] == [0] and r1["calls"] == []  # ran on the main process only
    assert r0["value"] == r1["value"] == {"indices": [3, 1, 4]}
    message = "few-shot split file s.json does not match this run"
    assert r0["error"] == f"DataError: {message}" and r1["error"] == f"BackmixError: {message}"
