"""Robustness of the BackMix map path: loss-scaled gradients, non-finite maps, recording only the
blocks the relevance reads, LoCoOp's regulariser under label mixing."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from backmix_vlm.augment import build_mixer
from backmix_vlm.adapters import create_adapter
from backmix_vlm.augment.base import MixResult
from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
from backmix_vlm.engine import trainer as trainer_mod
from backmix_vlm.engine.adapter_task import AdapterTask
from backmix_vlm.engine.tasks import ClassifierTask
from backmix_vlm.engine.trainer import Trainer
from backmix_vlm.models.cnn import create_cnn
from backmix_vlm.saliency.attention import AttentionRelevance
from test_resume import SIZE, K, tiny_dataset

CLASSES = ["cat", "dog", "car", "ship"]


def _vit(depth: int = 3) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=5).eval()


# ----------------------------------------------------------------------------- loss-scaled gradients
@pytest.mark.parametrize("start_layer", [0, -1])
def test_maps_from_a_scaled_backward_equal_the_unscaled_ones(start_layer):
    """fp16 + GradScaler back-propagates ``scale * loss``; maps(grad_scale=scale) must not see the scale
    (all-layer relevance R = I + A·R is not scale-invariant, so without it the maps would differ)."""
    model = _vit()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    extractor = AttentionRelevance(model, start_layer=start_layer)
    maps = {}
    for scale in (1.0, 4096.0):
        with extractor.record() as rec:
            out = model(x)
        (scale * torch.nn.functional.cross_entropy(out, y)).backward()
        maps[scale] = rec.maps(grad_scale=scale)
        unscaled_by_mistake = rec.maps()
        model.zero_grad()
    torch.testing.assert_close(maps[4096.0], maps[1.0], atol=1e-5, rtol=1e-4)
    if start_layer == 0:
        assert not torch.allclose(unscaled_by_mistake, maps[1.0], atol=1e-3)


def test_trainer_hands_the_step_loss_scale_to_the_task(tmp_path, monkeypatch):
    seen = []

    class Recording(ClassifierTask):
        def saliency_from_output(self, output, images, labels, grad_scale=1.0):
            seen.append(grad_scale)
            return super().saliency_from_output(output, images, labels, grad_scale)

    class Scaler:  # what Accelerate exposes under fp16: the scale of the step, read before update()
        def is_enabled(self):
            return True

        def get_scale(self):
            return 1024.0

    class Acc:
        scaler = Scaler()

    assert trainer_mod._loss_scale(Acc()) == 1024.0 and trainer_mod._loss_scale(object()) == 1.0
    monkeypatch.setattr(trainer_mod, "_loss_scale", lambda acc: 1024.0)
    torch.manual_seed(0)
    trainer = Trainer(Recording(create_cnn("small_cnn", K, width=4), SIZE), tiny_dataset(8),
                      optim=OptimConfig(epochs=1, batch_size=8, lr=0.05), run=RunConfig(device="cpu"),
                      run_dir=tmp_path, num_classes=K, mixer=build_mixer("backmix"))
    trainer.fit()
    assert seen == [1024.0]


# ----------------------------------------------------------------------------- non-finite maps
def test_non_finite_maps_never_enter_the_bank_and_are_counted(tmp_path):
    class Poisoned(ClassifierTask):
        def saliency_from_output(self, output, images, labels, grad_scale=1.0):
            maps = super().saliency_from_output(output, images, labels, grad_scale).clone()
            maps[0, 0, 0] = float("nan")   # first row of every batch: a NaN (e.g. fp16 overflow)
            maps[1] = float("inf")
            return maps

    torch.manual_seed(0)
    data = tiny_dataset(16)
    trainer = Trainer(Poisoned(create_cnn("small_cnn", K, width=4), SIZE), data,
                      optim=OptimConfig(epochs=1, batch_size=8, lr=0.05), run=RunConfig(device="cpu"),
                      run_dir=tmp_path, num_classes=K, mixer=build_mixer("backmix"), backmix=BackMixConfig(momentum=0.5))
    trainer.fit()
    bank = trainer.bank.bank
    assert torch.isfinite(bank).all()
    assert trainer.history[-1]["bank_skipped"] == 4  # 2 batches x 2 poisoned rows
    touched = (bank != 0.5).flatten(1).any(1)
    assert int(touched.sum()) == len(data) - 4  # the poisoned rows kept their initial value
    assert "bank_skipped" in (tmp_path / "log.csv").read_text().splitlines()[0]


def test_clean_runs_log_no_bank_skipped_column(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(ClassifierTask(create_cnn("small_cnn", K, width=4), SIZE), tiny_dataset(8),
                      optim=OptimConfig(epochs=1, batch_size=8, lr=0.05), run=RunConfig(device="cpu"),
                      run_dir=tmp_path, num_classes=K, mixer=build_mixer("backmix"))
    trainer.fit()
    assert "bank_skipped" not in trainer.history[-1]


# ----------------------------------------------------------------------------- explicit attention
@pytest.mark.parametrize("start_layer, explicit", [(-1, [2]), (1, [1, 2]), (0, [0, 1, 2])])
def test_recording_wraps_only_the_blocks_the_relevance_reads(start_layer, explicit):
    model = _vit(depth=3)
    extractor = AttentionRelevance(model, start_layer=start_layer)
    with extractor.record():
        patched = [i for i, block in enumerate(model.blocks) if "forward" in block.attn.__dict__]
    assert patched == explicit
    assert all("forward" not in block.attn.__dict__ for block in model.blocks)  # restored


def test_fused_lower_blocks_give_the_same_maps_as_all_explicit():
    """Blocks below start_layer keep their fused attention now: the maps equal those of a forward
    with every block explicit (the previous behaviour) up to float rounding."""
    from contextlib import nullcontext

    from backmix_vlm.saliency.attention import explicit_attention

    model = _vit(depth=3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 3])
    extractor = AttentionRelevance(model, start_layer=-1)
    maps = {}
    for all_explicit in (False, True):
        lower = explicit_attention(list(model.blocks)[:2], lambda i, a: a) if all_explicit else nullcontext()
        with lower, extractor.record() as rec:
            out = model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        maps[all_explicit] = rec.maps()
        model.zero_grad()
    assert maps[False].shape == (2, 4, 4)
    torch.testing.assert_close(maps[False], maps[True], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- LoCoOp + label mixing
def test_locoop_regularizer_kept_with_per_row_label_mixing(tiny_clip):
    torch.manual_seed(1)
    adapter = create_adapter("locoop", copy.deepcopy(tiny_clip.model), CLASSES, {"n_ctx": 4}).train()
    task = AdapterTask(adapter, 32)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = adapter(images)
    a, b = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 2, 3, 0, 2, 3])
    lam = 0.7
    scalar = task.loss(out, MixResult(images, a, b, lam))
    per_row = task.loss(out, MixResult(images, a, b, torch.full((6,), lam)))
    by_hand = lam * adapter.loss(out, a) + (1 - lam) * adapter.loss(out, b)
    torch.testing.assert_close(scalar, by_hand)
    torch.testing.assert_close(per_row, by_hand)  # constant per-row λ = the one-λ formula, regulariser included
    plain_ce = MixResult(images, a, b, torch.full((6,), lam)).loss(out.logits)
    assert float(adapter.regularizer(out, a).detach()) != 0.0 and not torch.allclose(per_row, plain_ce)


def test_coop_per_row_mixing_is_plain_weighted_cross_entropy(tiny_clip):
    torch.manual_seed(1)
    adapter = create_adapter("coop", copy.deepcopy(tiny_clip.model), CLASSES, {"n_ctx": 4}).train()
    task = AdapterTask(adapter, 32)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = adapter(images)
    mix = MixResult(images, torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0]), torch.tensor([1.0, 1.0, 0.3, 0.6]))
    assert adapter.regularizer(out, mix.labels_a) is None
    torch.testing.assert_close(task.loss(out, mix), mix.loss(out.logits))
