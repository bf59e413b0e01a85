"""LoCoOp: the local OOD regulariser against a hand computation, top-K rules, loss wiring."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from backmix_vlm.adapters import LoCoOp, LoCoOpConfig, create_adapter, locoop_regularizer, resolve_top_k
from backmix_vlm.errors import ConfigError
from backmix_vlm.models.output import ModelOutput

NAMES = ["cat", "dog", "car", "ship"]

# Hand-built local logits: log-probabilities, so softmax gives these distributions back.
A = [0.5, 0.25, 0.125, 0.125]      # top-2 = {0, 1}; H = 1.75 ln 2
B = [0.125, 0.125, 0.25, 0.5]      # top-2 = {3, 2}; H = 1.75 ln 2
C = [0.1, 0.2, 0.3, 0.4]           # top-2 = {3, 2}; H = H_C
D = [0.4, 0.3, 0.2, 0.1]           # top-2 = {0, 1}; H = H_C
H_AB = 1.75 * math.log(2)
H_C = -sum(p * math.log(p) for p in C)


def _local_logits():
    # image 0 (label 0): A keeps 0 in its top-2 -> foreground; B, C miss 0 -> background
    # image 1 (label 2): B keeps 2 -> foreground; A, D miss 2 -> background
    return torch.log(torch.tensor([[A, B, C], [B, A, D]], dtype=torch.float64))


@pytest.fixture(scope="module")
def tiny(tiny_clip):  # built once per session (conftest.py)
    return tiny_clip


def test_regularizer_equals_hand_computation():
    labels = torch.tensor([0, 2])
    reg = locoop_regularizer(_local_logits(), labels, top_k=2)
    # four background patches: B, C (image 0) and A, D (image 1); mean entropy, negated
    expected = -(H_AB + H_C + H_AB + H_C) / 4
    assert reg.item() == pytest.approx(expected, abs=1e-12)
    # top-1: image 0: A's argmax is 0 -> fg; B, C -> bg.  image 1: B, A, D all miss 2 -> bg
    reg1 = locoop_regularizer(_local_logits(), labels, top_k=1)
    assert reg1.item() == pytest.approx(-(H_AB + H_C + H_AB + H_AB + H_C) / 5, abs=1e-12)


def test_full_loss_is_ce_plus_lambda_times_regularizer(tiny):
    model = LoCoOp(tiny, NAMES, LoCoOpConfig(n_ctx=2, top_k=2, lambda_=0.5))
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 3.0, -2.0]])
    labels = torch.tensor([0, 2])
    out = ModelOutput(logits=logits, local_logits=_local_logits().float())
    # cross-entropy by hand: mean of logsumexp - logit[label]
    ce = sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), [0, 2])) / 2
    expected = ce + 0.5 * (-(H_AB + H_C + H_AB + H_C) / 4)
    assert model.loss(out, labels).item() == pytest.approx(expected, abs=1e-5)
    # lambda 0 is exactly CoOp's loss
    model.lambda_ = 0.0
    assert model.loss(out, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-7)


def test_gradient_only_reaches_background_patches():
    x = _local_logits().clone().requires_grad_(True)
    locoop_regularizer(x, torch.tensor([0, 2]), top_k=2).backward()
    fg = x.grad[0, 0].abs().sum() + x.grad[1, 0].abs().sum()
    assert fg.item() == 0.0
    assert all(x.grad[i, j].abs().sum() > 0 for i, j in [(0, 1), (0, 2), (1, 1), (1, 2)])
    # no background patch at all: 0, still differentiable (zero gradient)
    y = _local_logits()[:, :1].clone().requires_grad_(True)  # only the foreground patches
    reg = locoop_regularizer(y, torch.tensor([0, 2]), top_k=2)
    reg.backward()
    assert reg.item() == 0.0 and torch.count_nonzero(y.grad) == 0


def test_matches_official_reduction_up_to_log_epsilon():
    """AtsuMiyai/LoCoOp entropy_select_topk (softmax, top-k on probs, log(p + 1e-5), batch mean)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, 10, generator=g) * 3
    labels = torch.tensor([1, 4, 7])
    p = F.softmax(logits.view(-1, 10), dim=-1)
    pred = torch.topk(p, k=2, dim=1)[1]
    keep = ~pred.eq(labels.repeat_interleave(16).unsqueeze(1)).any(dim=1)
    sel = p[keep]
    official = torch.mean(torch.sum(sel * torch.log(sel + 1e-5), 1))  # = -entropy
    assert keep.sum() > 10
    assert locoop_regularizer(logits, labels, 2).item() == pytest.approx(official.item(), abs=1e-3)


def test_top_k_resolution():
    assert resolve_top_k(None, 1000) == 200  # LoCoOp's ImageNet setting
    assert resolve_top_k(None, 10) == 2      # same 20 % for CIFAR-10
    assert resolve_top_k(None, 2) == 1
    assert resolve_top_k(5, 10) == 5
    with pytest.raises(ConfigError, match="top_k: 10.*1..9"):
        resolve_top_k(10, 10)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        resolve_top_k(None, 1)


def test_forward_and_loss_on_tiny_clip(tiny):
    model = create_adapter("locoop", tiny, NAMES, {"n_ctx": 4})
    assert model.top_k == 1 and model.lambda_ == 0.25  # round(0.2 * 4) = 1
    assert model.trainable_parameter_names() == ["ctx"]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3])
    model.train()
    out = model(images, local=False)  # training always computes local features
    assert out.local_logits.shape == (2, 16, 4) and out.local_cosine.shape == (2, 16, 4)
    torch.testing.assert_close(out.local_logits, tiny.model.logit_scale.exp() * out.local_cosine)
    loss = model.loss(out, labels)
    expected = F.cross_entropy(out.logits, labels) + 0.25 * locoop_regularizer(out.local_logits, labels, 1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.ctx.grad is not None and model.ctx.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(images).local_cosine is not None        # GL-MCM needs it at eval
        no_local = model(images, local=False)
    assert no_local.local_logits is None
    with pytest.raises(ValueError, match="local_logits"):
        model.loss(no_local, labels)


def test_config_validation(tiny):
    with pytest.raises(ConfigError, match="top_k: 4"):
        create_adapter("locoop", tiny, NAMES, {"top_k": 4})
    with pytest.raises(ConfigError, match="lambda_"):
        create_adapter("locoop", tiny, NAMES, {"lambda_": -1})
    with pytest.raises(ConfigError, match="unknown config key.*topk"):
        create_adapter("locoop", tiny, NAMES, {"topk": 2})
