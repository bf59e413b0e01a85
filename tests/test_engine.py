"""Engine units: LR schedule, optimizer, checkpoint files, RNG capture, one training step."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backmix_vlm.augment import build_mixer
from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
from backmix_vlm.engine.checkpoint import (capture_rng_state, load_checkpoint, model_state_dict, restore_rng_state,
                                           save_checkpoint)
from backmix_vlm.engine.tasks import ClassifierTask
from backmix_vlm.engine.optim import build_optimizer, build_scheduler, lr_factor
from backmix_vlm.engine.trainer import Trainer, write_log_files
from backmix_vlm.errors import ConfigError, ModelError
from backmix_vlm.models.cnn import create_cnn
from backmix_vlm.saliency.cam import cam_foreground
from test_resume import tiny_dataset


# ----------------------------------------------------------------------------- schedule / optimizer
def test_lr_factor_cosine_with_constant_warmup():
    cfg = OptimConfig(lr=0.1, epochs=5, warmup_epochs=1, warmup_lr=1e-3, schedule="cosine")
    f = lambda s: lr_factor(s, steps_per_epoch=4, cfg=cfg)  # noqa: E731
    assert [f(s) for s in range(4)] == [pytest.approx(0.01)] * 4         # warm-up: constant warmup_lr
    assert f(4) == 1.0                                                    # cosine starts at lr
    assert f(4 + 8) == pytest.approx(0.5)                                 # half-way through 16 steps
    assert f(4 + 4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f(20) == pytest.approx(0.0, abs=1e-12)


def test_lr_factor_step_and_constant():
    step = OptimConfig(epochs=4, schedule="step")
    assert [lr_factor(s, steps_per_epoch=1, cfg=step) for s in range(4)] == [1.0, 1.0, pytest.approx(0.1),
                                                                            pytest.approx(0.01)]
    assert lr_factor(3, steps_per_epoch=1, cfg=OptimConfig(epochs=4, schedule="constant")) == 1.0


def test_scheduler_drives_the_optimizer_per_step():
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(lr=0.2, epochs=2, schedule="cosine")
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=2)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.2 * 0.5 * (1 + math.cos(math.pi / 4)), 0.1, 0.2 * 0.5 * (1 + math.cos(3 * math.pi / 4))])


def test_build_optimizer_paper_recipe_and_errors():
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(p, OptimConfig())
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.9, True, 5e-4)
    assert isinstance(build_optimizer(p, OptimConfig(name="adamw", lr=1e-3)), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="optim.name: 'adam' is not accepted"):
        build_optimizer(p, OptimConfig(name="adam"))
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([], OptimConfig())
    with pytest.raises(ConfigError, match="warmup_epochs"):
        build_scheduler(sgd, OptimConfig(epochs=2, warmup_epochs=2), 1)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_and_clear_errors(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 3, "w": torch.arange(4)})
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.arange(4))
    with pytest.raises(ModelError, match=f"checkpoint not found: {tmp_path / 'nope.pt'}"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:50])  # truncated
    with pytest.raises(ModelError, match=f"checkpoint {bad} is corrupt"):
        load_checkpoint(bad)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"epoch": 2, "oops": lambda: None})  # not picklable: fails mid-save
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind


def test_rng_capture_restores_every_generator():
    g = torch.Generator().manual_seed(5)
    state = capture_rng_state({"mix": g})
    draw = lambda: (random.random(), np.random.rand(), torch.rand(2).tolist(), torch.rand(1, generator=g).item())  # noqa: E731
    first = draw()
    restore_rng_state(state, {"mix": g})
    assert draw() == first
    with pytest.raises(ModelError, match="no state for random generator 'loader'"):
        restore_rng_state(state, {"loader": torch.Generator()})


def test_model_state_dict_trainable_only():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model[0].weight.requires_grad_(False)
    assert set(model_state_dict(model)) == set(model.state_dict())
    assert set(model_state_dict(model, trainable_only=True)) == {"0.bias", "1.weight", "1.bias"}


def test_log_files_have_a_column_for_every_key(tmp_path):
    write_log_files(tmp_path, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "auroc/x/msp": 0.75}])
    assert (tmp_path / "log.csv").read_text() == "epoch,loss,auroc/x/msp\n1,0.5,\n2,0.25,0.75\n"
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- one step
@pytest.mark.parametrize("mode", ["alongside", "mixed_only"])
def test_train_step_updates_bank_from_the_training_forward(tmp_path, mode):
    """Bank rows = beta * CAM foreground of the rows matching the clean batch + (1 - beta) * 0.5."""
    torch.manual_seed(0)
    model = create_cnn("small_cnn", 3, width=4)
    trainer = Trainer(ClassifierTask(model, 16), tiny_dataset(8), optim=OptimConfig(epochs=1, batch_size=4),
                      run=RunConfig(device="cpu"), run_dir=tmp_path, num_classes=3, mixer=build_mixer("backmix"),
                      backmix=BackMixConfig(mode=mode, momentum=0.1))
    seen = {}
    model.register_forward_hook(lambda m, i, o: seen.update(inputs=i[0].detach().clone(), cam=o.cam.detach().clone()))
    images = torch.stack([tiny_dataset(8)[i][0] for i in range(4)])
    labels, indices = torch.tensor([0, 1, 2, 0]), torch.tensor([5, 1, 7, 2])
    trainer.train_step(images, labels, indices)

    assert seen["inputs"].shape[0] == (8 if mode == "alongside" else 4)
    if mode == "alongside":
        assert torch.equal(seen["inputs"][:4], images)  # originals first, mixed after, one forward
    expected = 0.1 * cam_foreground(seen["cam"][:4], labels) + 0.9 * 0.5
    bank = trainer.bank.bank
    torch.testing.assert_close(bank[indices], F.adaptive_avg_pool2d(expected[:, None], bank.shape[-2:])[:, 0])
    untouched = torch.ones(8, dtype=torch.bool)
    untouched[indices] = False
    assert (bank[untouched] == 0.5).all()
    assert trainer.global_step == 1


def test_trainer_rejects_bad_settings(tmp_path):
    model = create_cnn("small_cnn", 3, width=4)
    kw = dict(run=RunConfig(device="cpu"), run_dir=tmp_path, num_classes=3)
    with pytest.raises(ConfigError, match="augment.name: 'mixupp' is not accepted"):
        build_mixer("mixupp")
    with pytest.raises(ConfigError, match="backmix.mode"):
        Trainer(ClassifierTask(model, 16), tiny_dataset(8), optim=OptimConfig(), mixer=build_mixer("backmix"),
                backmix=BackMixConfig(mode="both"), **kw)
    with pytest.raises(ConfigError, match="run.precision: fp16 autocast needs a CUDA GPU"):
        Trainer(ClassifierTask(model, 16), tiny_dataset(8), optim=OptimConfig(),
                run=RunConfig(device="cpu", precision="fp16"), run_dir=tmp_path, num_classes=3)


def test_best_checkpoint_follows_best_metric(tmp_path):
    model = create_cnn("small_cnn", 3, width=4)
    values = iter([0.5, 0.9, 0.7])
    trainer = Trainer(ClassifierTask(model, 16), tiny_dataset(8), optim=OptimConfig(epochs=3, batch_size=4),
                      run=RunConfig(device="cpu"), run_dir=tmp_path, num_classes=3, eval_every=1,
                      evaluate=lambda m, e: {"score": next(values)}, best_metric="score")
    trainer.fit()
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3 and trainer.best == 0.9
    wrong = Trainer(ClassifierTask(model, 16), tiny_dataset(8), optim=OptimConfig(epochs=1, batch_size=4),
                    run=RunConfig(device="cpu"), run_dir=tmp_path / "w", num_classes=3,
                    evaluate=lambda m, e: {"score": 1.0}, best_metric="acc")
    with pytest.raises(ConfigError, match="best_metric: 'acc' is not a logged metric; available: score"):
        wrong.fit()
