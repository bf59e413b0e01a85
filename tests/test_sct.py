"""SCT (LoCoOp option ``sct: true``): the loss against a hand computation and the official formula."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from backmix_vlm.adapters import LoCoOp, LoCoOpConfig, create_adapter
from backmix_vlm.adapters.locoop import sct_loss
from backmix_vlm.models.clip import TINY_CLIP, load_clip
from backmix_vlm.models.output import ModelOutput

NAMES = ["cat", "dog", "car", "ship"]
A, B = [0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5]
C, D = [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]
H_AB = 1.75 * math.log(2)
H_C = -sum(p * math.log(p) for p in C)
LOGITS = [[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 3.0, -2.0]]


def _local_logits():
    # top-2 with labels (0, 2): background patches are B, C (image 0) and A, D (image 1)
    return torch.log(torch.tensor([[A, B, C], [B, A, D]], dtype=torch.float64))


def _softmax(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def test_sct_loss_equals_hand_computation():
    labels = [0, 2]
    p = [_softmax(r)[y] for r, y in zip(LOGITS, labels)]
    ce = [-math.log(pi) for pi in p]
    loss_id = ((1 - p[0]) * ce[0] + (1 - p[1]) * ce[1]) / 2
    reg = -(p[0] * H_AB + p[0] * H_C + p[1] * H_AB + p[1] * H_C) / 4
    got = sct_loss(torch.tensor(LOGITS, dtype=torch.float64), _local_logits(), torch.tensor(labels), 2, 0.5)
    assert got.item() == pytest.approx(loss_id + 0.5 * reg, abs=1e-6)


def _official(logits, local, labels, top_k, lam):
    """tmlr-group/SCT trainers/sct.py (fp32 branch), restated: 1e-7 offsets and log(p + 1e-5)."""
    probs = F.softmax(logits, dim=1)
    true = probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    loss_id = (-(F.one_hot(labels, logits.shape[1]) * F.log_softmax(logits, 1)).sum(1) * (1.0000001 - true)).mean()
    b, n = local.shape[:2]
    q = F.softmax(local.reshape(b * n, -1), dim=-1)
    keep = ~q.topk(top_k, dim=1).indices.eq(labels.repeat_interleave(n).unsqueeze(1)).any(1)
    sel, w = q[keep], true.repeat_interleave(n)[keep]
    ent = -torch.mean(torch.sum(sel * torch.log(sel + 1e-5), 1) * (1e-7 + w))
    return loss_id + lam * -ent


def test_sct_matches_the_official_formula_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    local = torch.randn(6, 9, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 5, (6,), generator=g)
    ours = sct_loss(logits, local, labels, 2, 0.25)
    ref = _official(logits, local, labels, 2, 0.25)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-4)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(_official(logits, local, labels, 2, 0.25), logits)
    assert torch.allclose(g_ours, g_ref, atol=1e-4)  # weights are not detached, as in the official code
    (g_det,) = torch.autograd.grad(sct_loss(logits, local, labels, 2, 0.25, detach=True), logits)
    assert not torch.allclose(g_det, g_ours, atol=1e-4)


def test_sct_is_a_locoop_option():
    torch.manual_seed(0)
    tiny = load_clip(TINY_CLIP, pretrained=None)
    model = create_adapter("locoop", tiny, NAMES, {"n_ctx": 2, "top_k": 2, "lambda_": 0.5, "sct": True})
    assert isinstance(model, LoCoOp) and model.cfg.sct
    out = ModelOutput(logits=torch.tensor(LOGITS), local_logits=_local_logits().float())
    labels = torch.tensor([0, 2])
    assert model.loss(out, labels).item() == pytest.approx(
        sct_loss(out.logits, out.local_logits, labels, 2, 0.5).item(), abs=1e-6)
    plain = LoCoOp(tiny, NAMES, LoCoOpConfig(n_ctx=2, top_k=2, lambda_=0.5))
    assert plain.loss(out, labels).item() != pytest.approx(model.loss(out, labels).item(), abs=1e-3)
