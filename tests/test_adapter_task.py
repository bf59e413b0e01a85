"""AdapterTask saliency paths: reuse-forward (CoOp/LoCoOp) = separate pass, VPT's recording feeds the bank."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Dataset

from backmix_vlm.augment import build_mixer
from backmix_vlm.adapters import create_adapter
from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
from backmix_vlm.engine.adapter_task import AdapterTask, SaliencyConfig
from backmix_vlm.engine.trainer import Trainer
from backmix_vlm.saliency.attention import AttentionRelevance, clip_logits_fn

CLASSES = ["cat", "dog", "car", "ship"]
GRID = (4, 4)  # tiny CLIP: 32 px, patch 8


@pytest.fixture(scope="module")
def tiny(tiny_clip_batch_first):  # built once per session (conftest.py)
    return tiny_clip_batch_first


def _adapter(tiny, method: str, seq_first: bool = False):
    torch.manual_seed(1)
    adapter = create_adapter(method, copy.deepcopy(tiny.model), CLASSES, {"n_ctx": 4}, tokenizer=tiny.tokenizer)
    if seq_first:  # open_clip's (L, N, D) layout: same math, other transposes
        transformer = adapter.base.visual.transformer
        transformer.batch_first = False
        for block in transformer.resblocks:
            block.attn.batch_first = False
    return adapter.train()


def _batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, len(CLASSES), (n,), generator=g)


def _separate_reference(adapter, images, labels, start_layer):
    """AttentionRelevance on the full images with clip_logits_fn: the documented separate pass."""
    with torch.no_grad():
        text = adapter.encode_text()
    extractor = AttentionRelevance(adapter.base, start_layer=start_layer, num_prefix_tokens=1, grid=GRID)
    return extractor(images, labels, clip_logits_fn(adapter.base, text))


# ----------------------------------------------------------------------------- maps
@pytest.mark.parametrize("method", ["coop", "locoop"])
@pytest.mark.parametrize("start_layer", [-1, 0])
@pytest.mark.parametrize("seq_first", [False, True])
def test_reuse_forward_maps_equal_separate_pass(tiny, method, start_layer, seq_first):
    adapter = _adapter(tiny, method, seq_first)
    task = AdapterTask(adapter, 32, SaliencyConfig(start_layer=start_layer))
    images, labels = _batch()
    mixed, _ = _batch(seed=1)
    ref = _separate_reference(adapter, images, labels, start_layer)

    plan = task.plan_step(adapter, images, labels)
    assert plan.source == "capture" and plan.maps is None  # deferred to the training forward
    out = task.forward(adapter, torch.cat([images, mixed]), plan)
    task.loss(out, _Mix(torch.cat([labels, labels]))).backward()
    with torch.no_grad():  # as the trainer calls it
        maps = task.bank_maps(plan, out, images, labels)

    assert maps.shape == (4, *GRID) and not maps.requires_grad
    assert float(maps.amax()) == 1.0  # min-max normalised, not a constant map
    torch.testing.assert_close(maps, ref, atol=1e-5, rtol=0)
    assert adapter.training and plan.stage == "done"  # state restored, capture consumed


def test_reuse_forward_skips_the_separate_pass(tiny):
    """Cost: block 0 and the text tower run once per step with reuse, twice with the separate pass."""
    counts = {}
    for reuse in (True, False):
        adapter = _adapter(tiny, "coop")
        task = AdapterTask(adapter, 32, SaliencyConfig(reuse_forward=reuse))
        calls = {"block0": 0, "text": 0}
        adapter.base.visual.transformer.resblocks[0].register_forward_hook(
            lambda *_: calls.__setitem__("block0", calls["block0"] + 1))
        adapter.base.transformer.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
        images, labels = _batch()
        plan = task.plan_step(adapter, images, labels)
        out = task.forward(adapter, torch.cat([images, images.flip(0)]), plan)
        task.loss(out, _Mix(torch.cat([labels, labels]))).backward()
        maps = task.bank_maps(plan, out, images, labels)
        assert maps.shape == (4, *GRID)
        counts[reuse] = calls
    assert counts[True] == {"block0": 1, "text": 1}
    assert counts[False] == {"block0": 2, "text": 2}


def test_reuse_forward_bf16_close_to_fp32(tiny):
    adapter = _adapter(tiny, "coop")
    images, labels = _batch()
    ref = _separate_reference(adapter, images, labels, -1)
    task = AdapterTask(adapter, 32, SaliencyConfig(), precision="bf16")
    plan = task.plan_step(adapter, images, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task.forward(adapter, torch.cat([images, images]), plan)
    maps = task.bank_maps(plan, out, images, labels)
    assert maps.dtype == torch.float32
    assert float((maps - ref).abs().mean()) < 0.05


# ----------------------------------------------------------------------------- trainer
class _Mix:
    def __init__(self, labels):
        self.labels_a, self.labels_b, self.lam = labels, None, 1.0


class _Images(Dataset):
    def __init__(self, n: int = 8):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.arange(n) % len(CLASSES)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), i


def _trainer_step(tiny, tmp_path, method, saliency, mode="alongside"):
    adapter = _adapter(tiny, method)
    calls = []
    adapter.base.visual.transformer.resblocks[0].register_forward_hook(lambda m, args, out: calls.append(out.shape))
    task = AdapterTask(adapter, 32, saliency)
    data = _Images()
    trainer = Trainer(task, data, optim=OptimConfig(lr=0.01, epochs=1, batch_size=4), run=RunConfig(device="cpu", seed=5),
                      run_dir=tmp_path, num_classes=len(CLASSES), mixer=build_mixer("backmix"),
                      backmix=BackMixConfig(mode=mode, momentum=0.5))
    idx = torch.tensor([6, 1, 3, 4])
    images, labels = data.x[idx], data.y[idx]
    trainer.train_step(images, labels, idx)
    return trainer, adapter, images, labels, idx, [shape[0] for shape in calls]


@pytest.mark.parametrize("method,mode", [("coop", "alongside"), ("locoop", "alongside"), ("coop", "mixed_only")])
def test_trainer_step_reuse_updates_bank_like_separate_pass(tiny, tmp_path, method, mode):
    runs = {reuse: _trainer_step(tiny, tmp_path / str(reuse), method, SaliencyConfig(reuse_forward=reuse), mode)
            for reuse in (True, False)}
    (t_reuse, a_reuse, images, labels, idx, rows_reuse), (t_sep, a_sep, *_, rows_sep) = runs[True], runs[False]
    # block 0 runs: training forward (8 rows alongside, 4 mixed_only) + separate pass (4) unless reused
    training_rows = 8 if mode == "alongside" else 4
    assert rows_sep == [4, training_rows]
    assert rows_reuse == ([training_rows] if mode == "alongside" else [4, training_rows])
    bank = t_reuse.bank.bank
    torch.testing.assert_close(bank, t_sep.bank.bank, atol=1e-5, rtol=0)
    torch.testing.assert_close(a_reuse.ctx, a_sep.ctx, atol=0, rtol=0)  # the training step itself is untouched
    others = torch.ones(len(bank), dtype=torch.bool)
    others[idx] = False
    assert torch.all(bank[others] == 0.5)  # rows outside the batch keep the initial value
    # updated rows = 0.5 * map + 0.5 * 0.5, maps from the pre-step adapter: same as its separate pass
    pre_step = _adapter(tiny, method)
    expected = 0.5 * _separate_reference(pre_step, images, labels, -1) + 0.25
    torch.testing.assert_close(bank[idx], expected, atol=1e-5, rtol=0)


def test_vpt_recording_updates_bank_from_training_backward(tiny, tmp_path):
    """VPT (reuse_backward): bank rows = EMA of Recording.maps of the very forward/backward the step ran."""
    torch.manual_seed(2)
    seen = {}
    adapter = create_adapter("vpt", copy.deepcopy(tiny.model), CLASSES, {"num_tokens": 2})
    reference = copy.deepcopy(adapter).train()
    adapter.register_forward_pre_hook(lambda m, args: seen.setdefault("images", args[0].detach().clone()))
    task = AdapterTask(adapter, 32, SaliencyConfig())
    data = _Images()
    trainer = Trainer(task, data, optim=OptimConfig(lr=0.01, epochs=1, batch_size=4), run=RunConfig(device="cpu", seed=5),
                      run_dir=tmp_path, num_classes=len(CLASSES), mixer=build_mixer("backmix"), backmix=BackMixConfig(momentum=0.5))
    idx = torch.tensor([0, 2, 5, 7])
    images, labels = data.x[idx], data.y[idx]
    trainer.train_step(images, labels, idx)

    batch = seen["images"]
    assert batch.shape[0] == 8 and torch.equal(batch[:4], images)  # one forward: originals + mixed
    extractor = AttentionRelevance(list(reference.blocks), start_layer=-1, num_prefix_tokens=reference.num_prefix_tokens,
                                   grid=GRID)
    with extractor.record() as rec:
        out = reference(batch)
    reference.loss(out, torch.cat([labels, labels])).backward()
    expected = 0.5 * rec.maps()[:4] + 0.25
    bank = trainer.bank.bank
    torch.testing.assert_close(bank[idx], expected, atol=1e-6, rtol=0)
    assert float(bank[idx].amax()) == 0.75 and float(bank[idx].amin()) == 0.25  # real min-max maps went in
