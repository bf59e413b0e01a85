"""The fast CNN recipe: airbench-class net, TTA, schedule, optimizer groups, uint8 cache."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backmix_vlm.augment.base import MixResult
from backmix_vlm.augment.geometry import RandomCropFlip, ViewGeometry, build_views
from backmix_vlm.config import OptimConfig, ViewsConfig
from backmix_vlm.engine.tasks import ClassifierTask
from backmix_vlm.engine.lookahead import Lookahead
from backmix_vlm.engine.optim import build_optimizer, build_scheduler, frozen_after, lr_factor, norm_parameters
from backmix_vlm.errors import ConfigError, ModelError
from backmix_vlm.models.cnn import create_cnn


def test_whitening_init_whitens_training_patches() -> None:
    torch.manual_seed(0)
    mix = torch.randn(3, 3)
    images = torch.einsum("ij,bjhw->bihw", mix, torch.randn(64, 3, 16, 16))  # correlated channels
    model = create_cnn("airbench", 10, widths=[8, 8, 8])
    model.backbone.init_from_data(images)
    w = model.backbone.whiten.weight                      # (24, 3, 2, 2): 12 filters, then their negatives
    assert torch.equal(w[12:], -w[:12])
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    out = patches @ w[:12].reshape(12, -1).T               # whitened responses of every patch
    cov = out.T @ out / out.shape[0]
    assert torch.allclose(cov, torch.eye(12), atol=2e-2)   # eps = 5e-4 keeps it just below 1
    assert not w.requires_grad


def test_airbench_shapes_cam_and_frozen_bn_scale() -> None:
    model = create_cnn("airbench", 6)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 6) and out.cam.shape == (2, 6, 4, 4) and model.cam_size(32) == (4, 4)
    assert torch.allclose(out.logits, out.cam.mean(dim=(2, 3)))     # CAM head: GAP of the maps
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(not m.weight.requires_grad and m.bias.requires_grad for m in bn)
    with pytest.raises(ModelError, match="tta"):
        create_cnn("airbench", 6, tta="rotate")


def test_max_pool_head_is_airbench_linear_on_pooled_features() -> None:
    torch.manual_seed(0)
    model = create_cnn("airbench", 6, widths=[8, 8, 8], head_pool="max")
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    fmap = model.backbone(x)
    pooled = fmap.amax(dim=(2, 3))                                  # global max-pool, then the 1x1 weights
    w = model.head.conv.weight.flatten(1)
    assert torch.allclose(out.logits, pooled @ w.T / 9, atol=1e-6)  # airbench: no bias, 1/9 scale
    assert torch.allclose(out.cam, torch.einsum("kc,bchw->bkhw", w, fmap) / 9, atol=1e-6)
    assert torch.allclose(out.features, pooled)
    assert not torch.allclose(out.logits, out.cam.mean(dim=(2, 3)))  # not the CAM's mean any more
    with pytest.raises(ModelError, match="head_pool"):
        create_cnn("airbench", 6, head_pool="median")


def test_tta_averages_the_views_as_airbench() -> None:
    torch.manual_seed(0)
    model = create_cnn("small_cnn", 4, width=4, tta="flip_translate").eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        got = model(x).logits
        f = lambda v: model._forward(v).logits  # noqa: E731
        mirror = lambda v: 0.5 * f(v) + 0.5 * f(v.flip(-1))  # noqa: E731
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        want = 0.5 * mirror(x) + 0.25 * mirror(padded[..., :8, :8]) + 0.25 * mirror(padded[..., 2:, 2:])
    assert torch.allclose(got, want, atol=1e-6)
    model.train()
    assert torch.equal(model(x).logits, model._forward(x).logits)  # training forwards are never augmented


def test_triangle_schedule_hand_values() -> None:
    cfg = OptimConfig(lr=1.0, epochs=10, schedule="triangle", warmup_epochs=0)
    f = functools.partial(lr_factor, steps_per_epoch=10, cfg=cfg)
    assert f(0) == pytest.approx(0.2)
    assert f(23) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.07)
    assert f(50) == pytest.approx(1 + (0.07 - 1) * (0.5 - 0.23) / 0.77)


def test_norm_lr_scale_groups_keep_decay_per_step() -> None:
    model = create_cnn("small_cnn", 3, width=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, OptimConfig(lr=0.1, weight_decay=0.01, norm_lr_scale=64), norm_parameters(model))
    plain, norm = opt.param_groups
    assert norm["lr"] == pytest.approx(6.4) and norm["lr"] * norm["weight_decay"] == pytest.approx(0.1 * 0.01)
    assert {id(p) for p in norm["params"]} == norm_parameters(model)
    assert len(plain["params"]) + len(norm["params"]) == len(params)
    with pytest.raises(ConfigError, match="norm_lr_scale"):
        build_optimizer(params, OptimConfig(norm_lr_scale=0), set())


def test_label_smoothing_loss() -> None:
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    task = ClassifierTask(torch.nn.Identity(), 8, label_smoothing=0.2)
    got = task.loss(type("O", (), {"logits": logits})(), MixResult(logits, y))
    assert torch.allclose(got, F.cross_entropy(logits, y, label_smoothing=0.2))
    with pytest.raises(ConfigError, match="label_smoothing"):
        ClassifierTask(torch.nn.Identity(), 8, label_smoothing=1.0)


def test_uint8_views_equal_normalised_float_views() -> None:
    """data.cache: memory (uint8 on the device, normalised there) == the float path, per pixel."""
    rng = np.random.default_rng(0)
    raw = torch.as_tensor(rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    views = build_views("crop_flip", {"padding": 3}, mean, std)
    a, ga = views(raw, torch.Generator().manual_seed(1))
    normalised = (raw.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    b, gb = views(normalised, torch.Generator().manual_seed(1))
    assert torch.equal(ga.boxes, gb.boxes) and torch.equal(ga.flip, gb.flip)
    assert torch.allclose(a, b, atol=1e-5)


def test_reflect_padding_is_symmetric_at_the_border() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    g = ViewGeometry(torch.tensor([[-0.5, 0.0, 0.5, 1.0]]), torch.tensor([False]))  # 2 px up
    out = g.warp_images(x, pad_mode="reflect")
    ref = F.pad(x, (0, 0, 2, 0), mode="replicate")  # rows -2, -1 mirror rows 1, 0
    ref[..., 0, :] = x[..., 1, :]
    assert torch.equal(out[..., :4, :], torch.cat([ref[..., :2, :], x[..., :2, :]], dim=2))
    with pytest.raises(ConfigError, match="pad_mode"):
        RandomCropFlip(pad_mode="wrap")


def test_reflect_101_crops_equal_airbench_translate() -> None:
    # airbench's translate: F.pad(..., "reflect") by 2 px, then a 32 px crop at the drawn offset
    images = (torch.rand(256, 3, 8, 8) * 255).to(torch.uint8)
    g = RandomCropFlip(padding=2, pad_mode="reflect_101", flip_p=0.0)(256, (8, 8), torch.Generator().manual_seed(1),
                                                                       torch.device("cpu"))
    padded = F.pad(images.float(), (2, 2, 2, 2), mode="reflect")
    want = torch.stack([padded[i, :, 2 + dy:10 + dy, 2 + dx:10 + dx] for i, (dy, dx) in enumerate(g.shift.tolist())])
    assert {tuple(s) for s in g.shift.tolist()} == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert torch.equal(g.shift_images(images, "reflect_101").float(), want)
    # ... and differs from "reflect" (edge pixel repeated) exactly where a crop reaches outside the image
    assert not torch.equal(g.shift_images(images, "reflect"), g.shift_images(images, "reflect_101"))
    with pytest.raises(ConfigError, match="reflect_101"):
        g.warp_images(images.float(), pad_mode="reflect_101")
    with pytest.raises(ConfigError, match="padding < the image size"):
        ViewGeometry(torch.tensor([[1.0, 0.0, 2.0, 1.0]]), torch.tensor([False]), torch.tensor([[8, 0]])).shift_images(
            images[:1], "reflect_101")


def test_memory_cache_refuses_loader_views() -> None:
    from backmix_vlm.augment.geometry import train_pipeline

    with pytest.raises(ConfigError, match="data.cache: memory"):
        train_pipeline(ViewsConfig(name="loader"), 32, [0.5] * 3, [0.25] * 3, uint8=True)
    tf, views = train_pipeline(ViewsConfig(name="none"), 32, [0.5] * 3, [0.25] * 3, uint8=True)
    assert views is not None and math.isclose(views.mean[0], 0.5)   # still normalises on the device


def test_train_job_fast_recipe_end_to_end(tmp_path):
    """airbench + uint8 memory cache + device views + BackMix + TTA through `backmix-vlm train`."""
    import json
    import sys
    from pathlib import Path

    import yaml

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import write_config

    from backmix_vlm.cli import main as cli
    from backmix_vlm.engine.checkpoint import load_checkpoint

    path = write_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"] = {"name": "airbench", "options": {"widths": [8, 8, 8], "tta": "flip"}}
    cfg["data"].update(cache="memory", views={"name": "crop_flip", "options": {"padding": 2, "pad_mode": "reflect"}})
    cfg["optim"].update(label_smoothing=0.2, norm_lr_scale=64, schedule="triangle", momentum=0.85)
    cfg["run"].update(channels_last=True, precision="bf16")
    cfg["plots"] = False
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 2 and 0.0 <= results["acc"] <= 1.0
    state = load_checkpoint(run / "last.pt")
    assert state["bank"]["bank"].shape == (24, 2, 2)          # 16 px / stride 8
    assert not torch.allclose(state["bank"]["bank"], torch.full_like(state["bank"]["bank"], 0.5))
    assert "views" in state["rng"][0]["generators"]


def test_ood_linear_head_of_a_scaled_cam_head_reproduces_the_logits() -> None:
    """airbench's CAM head multiplies by 1/9: the head the OOD scores re-run must include it."""
    from backmix_vlm.models.classifier import FeatureClassifier
    from backmix_vlm.models.heads import find_linear_head

    torch.manual_seed(0)
    net = create_cnn("airbench", 5, widths=[8, 8, 8], tta="flip").eval()
    wrapped = FeatureClassifier(net)
    with torch.no_grad():
        out = wrapped(torch.randn(4, 3, 16, 16))
    for head in (find_linear_head(net), wrapped.linear_head()):
        assert torch.allclose(head(out.features), out.logits, atol=1e-5)


def test_lookahead_hand_computed() -> None:
    """airbench's schedule: every 5 steps slow <- slow + (1 - d) (fast - slow), fast <- slow, with
    d = 0.95^5 (step / total)^3; after the last step the model is the slow copy.  BatchNorm statistics
    are averaged too; frozen parameters are not copied."""
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    model[1].weight.requires_grad_(False)
    look = Lookahead(model, total_steps=10)
    assert set(look.slow) == {"0.weight", "1.bias", "1.running_mean", "1.running_var"}
    w = model[0].weight
    with torch.no_grad():
        w.fill_(1.0)
        look.slow["0.weight"].fill_(1.0)
        for step in range(1, 11):
            w.add_(1.0)  # "the optimizer step": +1 per step
            before = float(w)
            look.step(model, step)
            if step == 5:  # d = 0.95^5 / 8: slow = 1 + (1 - d) * (6 - 1)
                d = 0.95 ** 5 * 0.5 ** 3
                assert float(w) == pytest.approx(1 + (1 - d) * 5)
                slow5 = float(w)
            elif step == 10:  # d = 0.95^5, then the final copy
                d = 0.95 ** 5
                assert float(w) == pytest.approx(slow5 + (1 - d) * (slow5 + 5 - slow5))
            else:
                assert float(w) == before  # no sync between the every-5 steps
        model[1].running_mean.fill_(2.0)
        look.step(model, 15)  # a later sync moves the buffers as well
        assert 0.0 < float(model[1].running_mean) < 2.0


def test_freeze_after_stops_a_parameter_group_and_checks_patterns() -> None:
    model = create_cnn("airbench", 3, widths=[8, 8, 8])
    params = [p for p in model.parameters() if p.requires_grad]
    stop = frozen_after(model, {"*whiten.bias": 3})
    assert stop == {id(model.backbone.whiten.bias): 3}
    opt = build_optimizer(params, OptimConfig(lr=1.0, norm_lr_scale=64), norm_parameters(model), stop)
    frozen = [g for g in opt.param_groups if "train_epochs" in g]
    assert len(frozen) == 1 and frozen[0]["params"] == [model.backbone.whiten.bias]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    sched = build_scheduler(opt, OptimConfig(lr=1.0, epochs=5, schedule="constant", norm_lr_scale=64), 2)
    lrs = []
    for _ in range(8):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    i = opt.param_groups.index(frozen[0])
    assert [row[i] for row in lrs] == [1.0] * 6 + [0.0] * 2  # 3 epochs of 2 steps, then 0
    assert all(row[j] > 0 for row in lrs for j in range(len(row)) if j != i)
    with pytest.raises(ConfigError, match=r"freeze_after: '\*nothing' matches no trainable parameter"):
        frozen_after(model, {"*nothing": 1})
    with pytest.raises(ConfigError, match="freeze_after"):
        OptimConfig(freeze_after={"*whiten.bias": -1}).validate()
    assert frozen_after(model, {"*whiten.bias": None}) == {}  # null: trains throughout (undoes a _base_)
    OptimConfig(freeze_after={"*whiten.bias": None}).validate()


def test_alternating_flip_flips_every_image_every_other_epoch() -> None:
    from backmix_vlm.augment.geometry import alternating_flips

    idx = torch.arange(4000)
    e0, e1, e2 = (alternating_flips(idx, e, seed=3) for e in (0, 1, 2))
    assert torch.equal(e0, ~e1) and torch.equal(e0, e2)       # seen both ways in any two epochs
    assert abs(e0.float().mean().item() - 0.5) < 0.03          # a fair coin per image
    assert (e0 != alternating_flips(idx, 0, seed=4)).float().mean() > 0.4  # another run seed, other bits
    views = build_views("crop_flip", {"padding": 2, "pad_mode": "reflect", "flip": "alternate"})
    random_views = build_views("crop_flip", {"padding": 2, "pad_mode": "reflect"})
    x = torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8)
    rows = torch.tensor([5, 9, 0, 3, 7, 1, 2, 11])
    _, g = views(x, torch.Generator().manual_seed(0), indices=rows, epoch=1, seed=3)
    _, g_random = random_views(x, torch.Generator().manual_seed(0))
    assert torch.equal(g.shift, g_random.shift)                 # same crops: only the flips differ
    assert torch.equal(g.flip, alternating_flips(rows, 1, seed=3))
    with pytest.raises(ConfigError, match="alternate"):
        views(x, torch.Generator())
    with pytest.raises(ConfigError, match="flip="):
        build_views("crop_flip", {"flip": "sometimes"})
