"""``train`` and ``fewshot`` on 2 processes (gloo on CPU, started by ``torchrun``) against 1 process.

Each multi-process run goes through ``tests/ddp_probe.py``, which records the files every process
writes and dumps each process's mask bank, trainable weights and per-row bank-update counts.

What "the same numbers as one process" means (docs/distributed.md):

* Without per-process random streams (``backmix.enabled=false``, ``data.views.name=none``) a
  2-process run computes the 1-process gradients (DDP averages the two half-batch means of the
  same global batch), up to the float summation order: weights within 1e-6, metrics within 1e-6.
* With BackMix or random views each process draws its own crops, partners and masks (generators
  seeded by seed, epoch and rank; partners come from the process's share of the batch), so a
  2-process run is another random draw, like another seed: equal in kind, not in value.  Those
  runs are checked by invariants: banks and weights equal on every process, every image's bank
  row updated exactly once per epoch (the sampler's padding never updates it), one writer.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from backmix_vlm.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("ddp_probe.py")
FEWSHOT = ROOT / "configs" / "fewshot" / "tiny_demo.yaml"
FAST = ["data.shots=2", "optim.epochs=2", "optim.batch_size=10", "optim.warmup_epochs=0", "data.seeds=[1]",
        "eval.ood=[{name: demo, split: ood-cifar100, label: c100, max_samples: 30}]",
        "data.test.max_samples=30", "eval.batch_size=30"]
# no per-process random stream: 2 processes compute what 1 process does (up to summation order)
DETERMINISTIC = ["backmix.enabled=false", "data.views.name=none"]
TOL = 1e-6


def launch(tmp: Path, nproc: int, argv: list[str], *, probe: str, env: dict[str, str] | None = None,
           expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc tests/ddp_probe.py <argv>``; files recorded into ``tmp/<probe>``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", str(PROBE), *argv]
    full_env = {**os.environ, "PROBE_DIR": str(tmp / probe), "PROBE_WATCH": str(tmp / "runs"),
                "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                **(env or {})}
    out = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=1500)
    if expect_ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def writes(probe: Path, rank: int) -> set[str]:
    """What process ``rank`` created, wrote, renamed into place or removed under the runs folder
    (temp files of atomic writes left out), relative to it."""
    events = json.loads((probe / f"writes{rank}.json").read_text())
    return {p for _, p in events if not p.endswith(".tmp")}


def run_files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir.parent)) for p in run_dir.rglob("*") if p.is_file()}


def state(probe: Path, rank: int, run: str) -> dict:
    return torch.load(probe / f"state{rank}_{run}.pt", weights_only=False)


def metrics(results: dict) -> dict[str, float]:
    """Every number of a results.json (accuracy, each metric per set and score), by path."""
    out: dict[str, float] = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[path] = float(node)
    walk(results, "")
    return {k: v for k, v in out.items() if "time" not in k and not k.endswith("/processes")}


def assert_same_on_every_process(probe: Path, run: str, world: int = 2) -> dict:
    first = state(probe, 0, run)
    for rank in range(1, world):
        other = state(probe, rank, run)
        assert other["world"] == world
        for key in first["model"]:
            assert torch.equal(first["model"][key], other["model"][key]), key
        if first["bank"] is not None:
            assert torch.equal(first["bank"], other["bank"])
    return first


# ----------------------------------------------------------------------------- fewshot
@pytest.mark.slow  # 2 launches of 2 processes + 1 in-process run: ~40 s on 2 cores
def test_fewshot_two_processes_match_one_and_resume_after_kill(tmp_path):
    """CoOp, 2 seeds: rank 0 is SIGKILLed after seed 1's first checkpoint, ``--resume`` finishes the run;
    the result equals an uninterrupted 1-process run within float tolerance, and only rank 0 writes."""
    args = [str(FEWSHOT), f"run.output_dir={tmp_path / 'runs'}", *FAST, *DETERMINISTIC, "data.seeds=[1,2]"]
    assert cli_main(["fewshot", *args, "run.name=one"]) == 0
    killed = launch(tmp_path, 2, ["fewshot", *args, "run.name=two"], probe="killed", env={"PROBE_KILL": "0:1"},
                    expect_ok=False)
    assert killed.returncode != 0
    two = tmp_path / "runs" / "two"
    assert (two / "seed1" / "last.pt").is_file() and not (two / "seed1" / "results.json").exists()
    assert writes(tmp_path / "killed", 1) == set()
    launch(tmp_path, 2, ["fewshot", "--resume", *args, "run.name=two"], probe="resumed")

    one = tmp_path / "runs" / "one"
    info = json.loads((two / "run_info.json").read_text())
    assert info["status"] == "finished" and len(info["resumed"]) == 1
    # the same files, all written by the main process; the other process wrote nothing
    assert {f.replace("two/", "one/") for f in run_files(two)} == run_files(one)
    assert writes(tmp_path / "resumed", 1) == set()
    assert {f for f in writes(tmp_path / "resumed", 0) if f.startswith("two/")} >= {
        "two/results.json", "two/table_v_row.md", "two/seed1/results.json", "two/seed2/results.json",
        "two/seed1/last.pt", "two/seed1/scores.safetensors", "two/run_info.json"}
    for seed in (1, 2):  # weights: equal on both processes, and to the 1-process run within TOL
        mine = assert_same_on_every_process(tmp_path / "resumed", f"seed{seed}")
        ref = torch.load(one / f"seed{seed}" / "last.pt", weights_only=False)
        for key, value in ref["model"].items():
            assert torch.allclose(mine["model"][key], value, atol=TOL, rtol=0), key
        a = metrics(json.loads((one / f"seed{seed}" / "results.json").read_text()))
        b = metrics(json.loads((two / f"seed{seed}" / "results.json").read_text()))
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= TOL for k in a), \
            {k: (a[k], b[k]) for k in a if abs(a[k] - b[k]) > TOL}
    from safetensors.torch import load_file

    sa, sb = load_file(one / "seed2" / "scores.safetensors"), load_file(two / "seed2" / "scores.safetensors")
    assert sa.keys() == sb.keys()
    for key in sa:  # per-sample scores of the 1-process and the 2-process model
        assert torch.allclose(sa[key].double(), sb[key].double(), atol=1e-5, rtol=1e-5), key
    a, b = (metrics(json.loads((d / "results.json").read_text())) for d in (one, two))
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= TOL for k in a)


@pytest.mark.slow  # one launch of 2 processes: ~20 s on 2 cores
@pytest.mark.parametrize("method", [["method.name=coop"], ["method.name=lora", "method.options={}"]])
def test_fewshot_backmix_two_processes_one_bank_update_per_image(tmp_path, method):
    """19 images over 2 processes: the sampler pads rank 1 with a repeat of an image rank 0 trains on
    in another step; the bank still moves once per image per epoch and is the same on both processes."""
    args = [str(FEWSHOT), f"run.output_dir={tmp_path / 'runs'}", *FAST, *method, "data.shots=full",
            "data.train.max_samples=19", "run.name=bm"]
    launch(tmp_path, 2, ["fewshot", *args], probe="p")
    mine = assert_same_on_every_process(tmp_path / "p", "seed1")
    assert mine["bank"].shape[0] == 19
    assert mine["updates"] == [[1] * 19, [1] * 19]  # 2 epochs: each row once (rank 1's padding skipped)
    assert bool((mine["bank"] != 0.5).flatten(1).any(1).all())
    assert writes(tmp_path / "p", 1) == set()
    res = json.loads((tmp_path / "runs" / "bm" / "seed1" / "results.json").read_text())
    assert res["num_train"] == 19 and res["epochs"] == 2 and res["processes"] == 2
    assert set(res["results"]["c100"]) == {"mcm", "glmcm", "msp", "energy"}


# ----------------------------------------------------------------------------- train
@pytest.mark.slow  # 3 launches of 2 processes + 1 in-process run: ~60 s on 2 cores
def test_train_variants_two_processes_against_one_and_resume_after_kill(tmp_path, image_folder):
    """The CNN job with two variants (plain, BackMix), 23 images (the sampler pads rank 1), 2 epochs.

    BatchNorm normalises each process's half batch, so values differ from 1 process: banks and weights
    agree on every process, every bank row moves once per epoch, the files are those of a 1-process
    run, written by rank 0 only.  A run whose rank 0 is SIGKILLed after the first variant's first
    epoch and resumed on 2 processes ends bit for bit as the uninterrupted 2-process run."""
    from conftest import train_config

    cfg = train_config(tmp_path, image_folder, optim={"epochs": 2, "batch_size": 8, "lr": 0.05},
                       variants={"plain": ["backmix.enabled=false"], "backmix": []})
    args = ["train", str(cfg), "data.train.max_samples=23", f"run.output_dir={tmp_path / 'runs'}"]
    assert cli_main([*args, "run.name=one"]) == 0
    launch(tmp_path, 2, [*args, "run.name=two"], probe="p")
    killed = launch(tmp_path, 2, [*args, "run.name=cut"], probe="killed", env={"PROBE_KILL": "0:1"}, expect_ok=False)
    assert killed.returncode != 0  # rank 0 was SIGKILLed mid-run
    launch(tmp_path, 2, ["train", "--resume", *args[1:], "run.name=cut"], probe="r")

    runs = tmp_path / "runs"
    bm = assert_same_on_every_process(tmp_path / "p", "backmix")
    assert bm["updates"] == [[1] * 23, [1] * 23]
    assert assert_same_on_every_process(tmp_path / "p", "plain")["bank"] is None
    ref = torch.load(runs / "one" / "backmix" / "last.pt", weights_only=False)
    assert ref["bank"]["bank"].shape == bm["bank"].shape and ref["model"].keys() == bm["model"].keys()
    assert {f.replace("two/", "one/") for f in run_files(runs / "two")} == run_files(runs / "one")
    for probe in ("p", "killed", "r"):
        assert writes(tmp_path / probe, 1) == set(), probe
    a, b = (metrics(json.loads((runs / d / "results.json").read_text())) for d in ("one", "two"))
    assert a.keys() == b.keys()
    assert all(0.0 <= v <= 1.0 for k, v in b.items() if "/auroc" in k or k.endswith("/acc"))
    two = json.loads((runs / "two" / "backmix" / "results.json").read_text())
    assert [json.loads((runs / "one" / "backmix" / "results.json").read_text())["processes"], two["processes"]] == [1, 2]
    # kill -9 + --resume == uninterrupted, on 2 processes: weights, banks, logs, metrics
    for variant in ("plain", "backmix"):
        full, resumed = state(tmp_path / "p", 0, variant), assert_same_on_every_process(tmp_path / "r", variant)
        for key in full["model"]:
            assert torch.equal(full["model"][key], resumed["model"][key]), (variant, key)
        assert (full["bank"] is None and resumed["bank"] is None) or torch.equal(full["bank"], resumed["bank"])
        strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
        assert strip(full["history"]) == strip(resumed["history"])
    assert metrics(json.loads((runs / "cut" / "results.json").read_text())) == \
        metrics(json.loads((runs / "two" / "results.json").read_text()))
    assert json.loads((runs / "cut" / "run_info.json").read_text())["status"] == "finished"
