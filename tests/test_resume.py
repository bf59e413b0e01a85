"""Exact resume: 2 epochs in one go == 1 epoch, "crash", resume for 1 more (bitwise)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from backmix_vlm.augment import build_mixer
from backmix_vlm.config import BackMixConfig, OptimConfig, RunConfig
from backmix_vlm.data.dataset import ImageDataset
from backmix_vlm.data.records import ArrayRecords
from backmix_vlm.data.transforms import build_transform
from backmix_vlm.engine.checkpoint import LAST, load_checkpoint
from backmix_vlm.engine.tasks import ClassifierTask
from backmix_vlm.engine.trainer import Trainer
from backmix_vlm.errors import ModelError
from backmix_vlm.models.cnn import create_cnn

SIZE, K = 16, 3


def tiny_dataset(n: int = 40, k: int = K, size: int = SIZE, seed: int = 0, train_tf: bool = True) -> ImageDataset:
    """Random uint8 images with a class-coloured square: learnable, tiny, self-contained."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 120, size=(n, size, size, 3), dtype=np.uint8)
    labels = [i % k for i in range(n)]
    for i, y in enumerate(labels):
        x[i, 4:12, 4:12, y] = 255
    # random crop + flip in the transform: the data order AND augmentation must replay
    tf = build_transform(size, train=train_tf, mean=(0.5,) * 3, std=(0.25,) * 3)
    return ImageDataset(ArrayRecords(x, "tiny"), labels, [f"c{j}" for j in range(k)], "tiny", transform=tf)


def rng_hungry_eval(model, epoch):
    """An evaluator that touches every global RNG: the trainer must isolate it."""
    x = torch.randn(4, 3, SIZE, SIZE)
    random.random(), np.random.rand()
    with torch.no_grad():
        return {"acc": float(model(x).logits.softmax(-1).max(-1).values.mean())}


def make_trainer(run_dir, *, model_seed=0, eval_every=1, augment="backmix", num_workers=0, device_views=False,
                 **optim):
    from backmix_vlm.augment.geometry import build_views

    torch.manual_seed(model_seed)
    model = create_cnn("small_cnn", K, width=4)
    cfg = OptimConfig(epochs=2, batch_size=8, lr=0.05, **optim)
    # device_views: the loader gives canonical images, crop + flip are drawn by the trainer
    views = build_views("crop_flip", {"padding": 2}, (0.5,) * 3, (0.25,) * 3) if device_views else None
    return Trainer(ClassifierTask(model, SIZE), tiny_dataset(train_tf=not device_views), optim=cfg,
                   run=RunConfig(device="cpu", seed=3), run_dir=run_dir, num_classes=K, mixer=build_mixer(augment),
                   backmix=BackMixConfig(mode="alongside"), num_workers=num_workers, evaluate=rng_hungry_eval,
                   eval_every=eval_every, views=views)


def strip_time(history):
    return [{k: v for k, v in row.items() if k != "time"} for row in history]


def assert_same_state(a: Trainer, b: Trainer):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    if a.bank is not None:
        assert torch.equal(a.bank.bank, b.bank.bank)
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for i in oa:
        assert torch.equal(oa[i]["momentum_buffer"], ob[i]["momentum_buffer"])


@pytest.mark.parametrize("augment,num_workers,device_views,optim",
                         [("backmix", 0, False, {}), ("cutmix", 2, False, {}), ("backmix", 2, True, {}),
                          # airbench's lookahead (its slow copy is in the checkpoint) and a parameter frozen
                          # after epoch 1 (its LR group reaches 0 from the restored scheduler step)
                          ("backmix", 0, True, {"lookahead": True, "freeze_after": {"backbone.0.*": 1}})])
def test_resume_is_bitwise_exact(tmp_path, augment, num_workers, device_views, optim):
    kw = {"augment": augment, "num_workers": num_workers, "device_views": device_views, **optim}
    full = make_trainer(tmp_path / "full", **kw)
    full_log = full.fit()

    first = make_trainer(tmp_path / "split", **kw)
    first.fit(stop_after=1)  # "interrupted" after epoch 1 (checkpoint written)
    assert load_checkpoint(tmp_path / "split" / LAST)["epoch"] == 1

    torch.manual_seed(1234)  # a fresh process: other weights, other global RNG state
    random.seed(99)
    resumed = make_trainer(tmp_path / "split", model_seed=7, **kw)
    resumed_log = resumed.fit(resume=True)

    assert resumed.epoch == full.epoch == 2 and resumed.global_step == full.global_step
    assert_same_state(full, resumed)
    assert strip_time(resumed_log) == strip_time(full_log)
    if augment == "backmix":  # the bank really learnt something (not the 0.5 init)
        assert not torch.allclose(full.bank.bank, torch.full_like(full.bank.bank, 0.5))
    # the logs on disk hold each epoch once (no duplicate after resume)
    assert len((tmp_path / "split" / "log.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "split" / "log.csv").read_text() .count("\n") == 3


def test_evaluation_does_not_change_training(tmp_path):
    with_eval = make_trainer(tmp_path / "a", eval_every=1)
    with_eval.fit()
    without = make_trainer(tmp_path / "b", eval_every=0)
    without.evaluate = None
    without.fit()
    assert_same_state(with_eval, without)


def test_resume_refuses_a_changed_run(tmp_path):
    make_trainer(tmp_path).fit(stop_after=1)
    other = make_trainer(tmp_path)
    other.optim_cfg = OptimConfig(epochs=2, batch_size=4, lr=0.05)
    with pytest.raises(ModelError, match="batch_size was 8, now 4"):
        other.fit(resume=True)
    with pytest.raises(ModelError, match="checkpoint not found"):
        make_trainer(tmp_path / "nothing").fit(resume=True)
