"""Benchmark scripts: the official-CoOp re-implementation computes CoOp; the GPU script's CPU smoke mode."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from backmix_vlm.adapters import CoOp
from backmix_vlm.models.clip import TINY_CLIP, load_clip

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(path: Path, name: str):
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


def test_official_coop_reimplementation_equals_our_coop_in_fp32():
    """Same weights, same context: the official step's logits and context gradient are ours (fp32)."""
    bench = _load(SCRIPTS / "bench_speed.py", "bench_speed")
    torch.manual_seed(0)
    bundle = load_clip(TINY_CLIP, pretrained=None)
    names = ["cat", "sweet pepper", "maple_tree"]
    official = bench.OfficialCoOp(copy.deepcopy(bundle.model), bundle.tokenizer, names, n_ctx=4)
    ours = CoOp(bundle, names, {"n_ctx": 4})
    with torch.no_grad():
        ours.ctx.copy_(official.ctx)
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([0, 2, 1, 1, 0])
    want = official(images)
    got = ours(images).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.nn.functional.cross_entropy(want, labels).backward()
    torch.nn.functional.cross_entropy(got, labels).backward()
    torch.testing.assert_close(ours.ctx.grad, official.ctx.grad, atol=1e-6, rtol=1e-4)
    # the bf16 step runs (Dassl forward_backward under autocast, SGD)
    opt = torch.optim.SGD([official.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    before = official.ctx.detach().clone()
    loss = bench.official_step(official, opt, images, labels)
    assert loss == loss and not torch.equal(before, official.ctx)


@pytest.mark.parametrize("without", [pytest.param([], marks=pytest.mark.slow), ["open_clip", "accelerate"]])
def test_gpu_script_smoke_mode_runs_every_section_on_cpu(tmp_path, without):
    gpu = _load(SCRIPTS / "device" / "bench_speed_gpu.py", "bench_speed_gpu")
    report = gpu.main(["--smoke", "--out", str(tmp_path), "--without", *without])
    saved = json.loads((tmp_path / "bench_speed_gpu.json").read_text())
    assert saved["smoke"] is True and (tmp_path / "bench_speed_gpu.md").is_file()
    for section in ("matmul", "eval", "steps", "memory"):
        assert "error" not in report[section], report[section]
    timm_rows = [v for k, v in report["eval"].items() if k.startswith("timm")]
    assert timm_rows and "held in bf16" in timm_rows[0]  # the timm ViT always runs
    clip_rows = [v for k, v in report["eval"].items() if k.startswith("open_clip")]
    steps = report["steps"]
    if without:
        assert "open_clip is not installed" in clip_rows[0]["skipped"]
        assert all("accelerate is not installed" in v["skipped"] for v in steps.values())
    else:
        assert "held in bf16" in clip_rows[0]
        assert {"coop", "vpt (timm)"} <= set(steps) and all(v["plain (2B images)"]["images_per_s"] > 0
                                                           for v in steps.values())
        assert any("start_layer 0" in k for k in report["memory"])
