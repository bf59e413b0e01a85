"""run.precision: auto -- bf16 where the device computes it natively, fp16 on older CUDA GPUs,
float32 otherwise; the choice recorded in run_info.json and kept by config.yaml for resume;
explicit bf16 on a CPU without native bf16 warns once with the measured reason."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from backmix_vlm import compat, runtime
from backmix_vlm.cli import main as cli
from backmix_vlm.config import RunConfig
from backmix_vlm.runtime import resolve_precision, resolve_run_precision


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set whether this CPU 'has' native bf16 (oneDNN's check), and forget earlier warnings."""
    monkeypatch.setattr(runtime, "_warned", set())

    def set_native(native: bool) -> None:
        monkeypatch.setattr(compat, "cpu_native_bf16", lambda: native)

    return set_native


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "no")])
def test_auto_on_a_cpu_follows_native_bf16(cpu_bf16, native, expected):
    cpu_bf16(native)
    name, reason = resolve_precision("auto", "cpu")
    assert name == expected and reason.startswith("auto: ") and runtime.cpu_name() in reason
    assert ("no native bf16" in reason) == (not native)


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((6, 1), "fp16")])
def test_auto_on_a_gpu_is_bf16_from_ampere_and_fp16_before(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Some GPU")
    name, reason = resolve_precision("auto", "cuda")
    assert name == expected and f"compute capability {capability[0]}.{capability[1]}" in reason


def test_explicit_names_are_kept_and_auto_is_never_fp16_on_a_cpu(cpu_bf16):
    cpu_bf16(False)
    assert [resolve_precision(p, "cpu")[0] for p in ("no", "fp16", "auto")] == ["no", "fp16", "no"]
    with pytest.raises(Exception, match="run.precision: 'fp8' is not accepted; choose one of auto, no, bf16, fp16"):
        resolve_precision("fp8", "cpu")


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_once_with_the_reason(cpu_bf16, capsys):
    cpu_bf16(False)
    assert resolve_precision("bf16", "cpu")[0] == "bf16"  # the user's choice is kept
    assert resolve_precision("bf16", "cpu")[0] == "bf16"
    err = capsys.readouterr().err
    assert err.count("warning: run.precision: bf16 on a CPU without native bf16") == 1
    assert "~12x slower per image" in err and "run.precision=auto" in err
    cpu_bf16(True)
    resolve_precision("bf16", "cpu")
    assert capsys.readouterr().err == ""  # native: nothing to say


def test_a_run_config_is_resolved_once_in_place(cpu_bf16):
    cpu_bf16(True)
    run = RunConfig(device="cpu", precision="auto")
    record = resolve_run_precision(run)
    assert run.precision == "bf16" and record["requested"] == "auto" and record["resolved"] == "bf16"
    cpu_bf16(False)  # a later call (the trainer's) keeps the first decision
    assert resolve_run_precision(run) is record and run.precision == "bf16"
    assert "precision_record" not in __import__("dataclasses").asdict(run)  # config.yaml holds the name only


def test_run_info_records_the_choice_and_resume_keeps_the_saved_precision(tmp_path, tiny_train_config, cpu_bf16):
    cpu_bf16(False)
    assert cli(["train", str(tiny_train_config), "run.precision=auto"]) == 0
    run = tmp_path / "runs" / "tiny"
    info = json.loads((run / "run_info.json").read_text())
    assert info["precision"]["requested"] == "auto" and info["precision"]["resolved"] == "no"
    assert "no native bf16" in info["precision"]["reason"] and info["precision"]["device"] == "cpu"
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["precision"] == "no"
    cpu_bf16(True)  # the same run resumed on a machine with native bf16: it stays float32
    assert cli(["train", str(run), "--resume", "optim.epochs=2", "--allow-changes"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["precision"] == "no"
    assert "precision" in json.loads((run / "run_info.json").read_text())  # the first record stays


def test_auto_with_native_bf16_trains_bit_identically_to_pinned_bf16(tmp_path, tiny_train_config, cpu_bf16):
    from backmix_vlm.engine.checkpoint import load_checkpoint

    cpu_bf16(True)
    states = {}
    for precision in ("bf16", "auto"):
        assert cli(["train", str(tiny_train_config), f"run.precision={precision}", f"run.name={precision}"]) == 0
        states[precision] = load_checkpoint(tmp_path / "runs" / precision / "last.pt")["model"]
    assert states["bf16"].keys() == states["auto"].keys()
    assert all(torch.equal(states["bf16"][k], states["auto"][k]) for k in states["bf16"])


def test_machine_line_names_the_cpu_its_flags_and_the_precision():
    line = runtime.machine_line("bf16")
    assert line.startswith(f"cpu: {runtime.cpu_name()}; flags: ") and line.endswith("; precision: bf16")
    assert "kernels" in line and "native bf16: " in line
