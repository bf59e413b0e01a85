"""The explicit training step: StepPlan order, the trainer's call order, AdapterTask's plans, and
the map-path interface adapters expose (blocks, prefix tokens, tail logits, one vision view)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Dataset

from backmix_vlm.augment import build_mixer
from backmix_vlm.adapters import create_adapter
from backmix_vlm.adapters.vision import ClipVision, TimmViT
from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
from backmix_vlm.engine.adapter_task import AdapterTask, SaliencyConfig
from backmix_vlm.engine.tasks import PLAN_SOURCES, ClassifierTask, StepPlan, TrainTask
from backmix_vlm.engine.trainer import Trainer
from backmix_vlm.models.cnn import create_cnn

CLASSES = ["cat", "dog", "car", "ship"]


@pytest.fixture(scope="module")
def tiny(tiny_clip_batch_first):
    return tiny_clip_batch_first


def _adapter(tiny, method, **opts):
    torch.manual_seed(1)
    return create_adapter(method, copy.deepcopy(tiny.model), CLASSES, opts, tokenizer=tiny.tokenizer).train()


def _batch(n=4, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, len(CLASSES), (n,), generator=g)


class _Images(Dataset):
    def __init__(self, n=8, size=32):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.arange(n) % len(CLASSES)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i


# ----------------------------------------------------------------------------- the plan object
def test_plan_stages_go_in_order_once():
    plan = StepPlan("output")
    with pytest.raises(RuntimeError, match="bank maps asked while the plan is 'planned'"):
        plan.advance("done")
    plan.advance("forwarded")
    with pytest.raises(RuntimeError, match="a forward asked while the plan is 'forwarded'"):
        plan.advance("forwarded")
    plan.advance("done")
    with pytest.raises(RuntimeError, match="one plan serves one step"):
        plan.advance("done")
    with pytest.raises(ValueError, match="StepPlan.source: 'cam'"):
        StepPlan("cam")
    assert not StepPlan().wants_maps and StepPlan("record").wants_maps and "capture" in PLAN_SOURCES


def test_tasks_follow_the_protocol(tiny):
    assert isinstance(ClassifierTask(create_cnn("small_cnn", 4, width=4), 32), TrainTask)
    assert isinstance(AdapterTask(_adapter(tiny, "coop", n_ctx=4), 32), TrainTask)


def test_maps_before_the_forward_are_refused(tiny):
    adapter = _adapter(tiny, "vpt", num_tokens=2)
    task = AdapterTask(adapter, 32)
    images, labels = _batch()
    plan = task.plan_step(adapter, images, labels)
    with pytest.raises(RuntimeError, match="plan_step -> forward"):
        task.bank_maps(plan, None, images, labels)


# ----------------------------------------------------------------------------- the trainer's order
class _Spy(ClassifierTask):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls = []

    def plan_step(self, model, images, labels, **kw):
        self.calls.append(("plan", dict(kw)))
        return super().plan_step(model, images, labels, **kw)

    def forward(self, model, images, plan=None):
        if model.training:
            self.calls.append(("forward", None if plan is None else plan.stage))
        return super().forward(model, images, plan)

    def loss(self, output, mix):
        self.calls.append(("loss", None))
        return super().loss(output, mix)

    def bank_maps(self, plan, output, images, labels, grad_scale=1.0):
        first = next(self.model.parameters())
        self.calls.append(("maps", plan.stage, first.grad is not None))
        return super().bank_maps(plan, output, images, labels, grad_scale)


@pytest.mark.parametrize("augment", ["backmix", "cutmix"])
def test_trainer_calls_plan_forward_loss_maps_in_order(tmp_path, augment):
    torch.manual_seed(0)
    task = _Spy(create_cnn("small_cnn", len(CLASSES), width=4), 32)
    trainer = Trainer(task, _Images(), optim=OptimConfig(lr=0.05, epochs=1, batch_size=4),
                      run=RunConfig(device="cpu"), run_dir=tmp_path, num_classes=len(CLASSES), mixer=build_mixer(augment),
                      backmix=BackMixConfig(bank_update_every=2))
    trainer.fit()
    if augment == "cutmix":  # no bank: no plan, a plain forward
        assert task.calls == [("forward", None), ("loss", None)] * 2
        return
    step = [("plan", {"update_bank": True, "clean_first": True}), ("forward", "planned"), ("loss", None),
            ("maps", "forwarded", True)]  # maps after backward + optimizer step (gradients are there)
    second = [("plan", {"update_bank": False, "clean_first": True})] + step[1:]
    assert task.calls == step + second


# ----------------------------------------------------------------------------- AdapterTask plans
@pytest.mark.parametrize("method, opts, saliency, clean_first, source", [
    ("vpt", {"num_tokens": 2}, SaliencyConfig(), True, "record"),
    ("vpt", {"num_tokens": 2}, SaliencyConfig(), False, "record"),
    ("vpt", {"num_tokens": 2}, SaliencyConfig(reuse_backward=False), True, "ready"),
    ("coop", {"n_ctx": 4}, SaliencyConfig(), True, "capture"),
    ("coop", {"n_ctx": 4}, SaliencyConfig(), False, "ready"),          # mixed_only: no clean rows in the forward
    ("locoop", {"n_ctx": 4}, SaliencyConfig(reuse_forward=False), True, "ready"),
    ("coop", {"n_ctx": 4}, SaliencyConfig(source="local"), True, "ready"),
    ("lora", {}, SaliencyConfig(), True, "record"),
    ("lora", {"towers": ["text"]}, SaliencyConfig(), True, "capture"),
])
def test_plan_sources(tiny, method, opts, saliency, clean_first, source):
    adapter = _adapter(tiny, method, **opts)
    task = AdapterTask(adapter, 32, saliency)
    images, labels = _batch()
    plan = task.plan_step(adapter, images, labels, clean_first=clean_first)
    assert plan.source == source and (plan.maps is not None) == (source == "ready")
    if source == "ready":
        assert plan.maps.shape == (4, 4, 4) and plan.maps.dtype == torch.float32
    assert task.plan_step(adapter, images, labels, update_bank=False).source == "none"


@pytest.mark.parametrize("method, opts", [("coop", {"n_ctx": 4}), ("vpt", {"num_tokens": 2}), ("lora", {})])
def test_adapter_task_keeps_no_state_between_calls(tiny, method, opts):
    adapter = _adapter(tiny, method, **opts)
    task = AdapterTask(adapter, 32)
    task.extractor()
    before = dict(vars(task))
    images, labels = _batch()
    plan = task.plan_step(adapter, images, labels)
    out = task.forward(adapter, torch.cat([images, images.flip(0)]), plan)
    task.loss(out, _Mix(torch.cat([labels, labels]))).backward()
    with torch.no_grad():
        maps = task.bank_maps(plan, out, images, labels)
    assert maps.shape == (4, 4, 4) and torch.isfinite(maps).all()
    assert vars(task) == before and plan.stage == "done"
    assert adapter._text_sink is None  # keep_text_features left nothing behind


class _Mix:
    def __init__(self, labels):
        self.labels_a, self.labels_b, self.lam = labels, None, 1.0


# ----------------------------------------------------------------------------- what adapters expose
def test_one_vision_view_for_every_adapter(tiny):
    coop, vpt, lora = _adapter(tiny, "coop", n_ctx=4), _adapter(tiny, "vpt", num_tokens=3), _adapter(tiny, "lora")
    assert all(type(a.vision) is ClipVision for a in (coop, vpt, lora))
    assert vpt.vision is vpt.view and lora.vision is lora.view
    assert coop.image_blocks == list(coop.base.visual.transformer.resblocks)
    assert vpt.image_blocks == list(vpt.blocks)
    assert (coop.num_prefix_tokens, vpt.num_prefix_tokens, lora.num_prefix_tokens) == (1, 1 + 3, 1)
    assert coop.patch_size == vpt.patch_size == (8, 8)
    assert (coop.maps_from_backward, vpt.maps_from_backward, lora.maps_from_backward) == (False, True, True)
    assert (coop.encodes_text, vpt.encodes_text, lora.encodes_text) == (True, False, True)
    assert not _adapter(tiny, "lora", towers=["text"]).maps_from_backward


def test_timm_vit_view(tiny):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, reg_tokens=1)
    adapter = create_adapter("vpt", vit, CLASSES, {"num_tokens": 2})
    assert type(adapter.vision) is TimmViT and adapter.num_prefix_tokens == 2 + 2


@pytest.mark.parametrize("method", ["coop", "lora_text"])
@pytest.mark.parametrize("start", [0, 1])
def test_tail_logits_equal_the_map_logits_from_block_start(tiny, method, start):
    adapter = _adapter(tiny, "coop", n_ctx=4) if method == "coop" else _adapter(tiny, "lora", towers=["text"])
    adapter.eval()
    images, _ = _batch()
    view = adapter.vision
    with torch.no_grad():
        x = view.run_blocks(adapter.image_blocks[:start], view.embed(images))  # input of block `start`
        text = adapter.encode_text()
        tail = adapter.tail_logits_fn(start, text)(x)
        full = adapter.map_logits_fn()(images)
    torch.testing.assert_close(tail, full, rtol=0, atol=1e-5)


def test_keep_text_features_reports_the_forwards_text(tiny):
    adapter = _adapter(tiny, "coop", n_ctx=4)
    images, _ = _batch()
    with adapter.keep_text_features() as texts:
        adapter(images)
        adapter(images)  # only the first forward's
    assert len(texts) == 1 and not texts[0].requires_grad
    torch.testing.assert_close(texts[0], adapter.encode_text().detach(), rtol=0, atol=0)
    assert adapter._text_sink is None
