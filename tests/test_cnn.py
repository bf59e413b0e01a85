"""CNN backbones with a Conv1x1-GAP CAM head."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backmix_vlm.errors import BackmixError, ModelError
from backmix_vlm.models.cnn import CNN_MODELS, CamHead, create_cnn
from backmix_vlm.models.cnn import _WideBlock


def test_cam_head_is_gap_then_linear():
    g = torch.Generator().manual_seed(0)
    head = CamHead(6, 4).double()
    fmap = torch.randn(3, 6, 5, 7, generator=g, dtype=torch.float64)
    linear = nn.Linear(6, 4).double()
    linear.weight.data.copy_(head.conv.weight.view(4, 6))
    linear.bias.data.copy_(head.conv.bias)
    logits, cam = head(fmap)
    torch.testing.assert_close(logits, linear(fmap.mean((2, 3))), rtol=0, atol=1e-12)
    assert cam.shape == (3, 4, 5, 7)
    torch.testing.assert_close(cam, torch.einsum("kc,bchw->bkhw", linear.weight, fmap)
                               + linear.bias.view(1, 4, 1, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,dim,cam", [("resnet18_cifar", 512, 4), ("wrn40_4", 256, 8), ("small_cnn", 128, 8),
                                          ("airbench", 256, 4), ("airbench_wide", 384, 4)])
def test_model_outputs_and_cam_sizes(name, dim, cam):
    torch.manual_seed(0)
    model = create_cnn(name, 7).eval()
    s = model.stride
    assert CNN_MODELS.names() == ["airbench", "airbench_wide", "resnet18_cifar", "small_cnn", "wrn40_4"]
    fmaps = []
    model.backbone.register_forward_hook(lambda m, i, o: fmaps.append(o))
    with torch.no_grad():  # batch of one: wrn40_4 is slow on a shared 2-core CPU
        out = model(torch.randn(1, 3, 32, 32))
        odd = model(torch.randn(1, 3, 34, 30))
    assert out.logits.shape == (1, 7) and out.features.shape == (1, dim)
    assert out.cam.shape == (1, 7, cam, cam) and model.cam_size(32) == (cam, cam)
    assert torch.equal(out.logits, out.cam.mean((2, 3)))
    assert torch.equal(out.features, fmaps[0].mean((2, 3)))
    rounding = (34 // s, 30 // s) if name.startswith("airbench") else ((34 + s - 1) // s, (30 + s - 1) // s)
    assert tuple(odd.cam.shape[-2:]) == model.cam_size((34, 30)) == rounding  # max-pools round down


def test_backbone_structure():
    resnet = create_cnn("resnet18_cifar", 10)
    conv1 = resnet.backbone.model.conv1
    assert (conv1.kernel_size, conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(resnet.backbone.model.maxpool, nn.Identity)
    wrn = create_cnn("wrn40_4", 10)
    blocks = [m for m in wrn.modules() if isinstance(m, _WideBlock)]
    assert len(blocks) == 18  # (40 - 4) / 6 = 6 blocks in each of 3 groups
    assert [b.conv2.out_channels for b in blocks[::6]] == [64, 128, 256]


def test_cam_head_trains_end_to_end():
    torch.manual_seed(0)
    model = create_cnn("small_cnn", 3, width=4)
    out = model(torch.randn(4, 3, 16, 16))
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0])).backward()
    assert model.head.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_create_cnn_rejects_bad_input():
    with pytest.raises(BackmixError, match="unknown cnn model 'resnet9'.*small_cnn"):
        create_cnn("resnet9", 10)
    with pytest.raises(ModelError, match="unknown option.*depth.*accepted: drop_rate, in_chans"):
        create_cnn("wrn40_4", 10, depth=28)
    with pytest.raises(ModelError, match="num_classes=0"):
        create_cnn("small_cnn", 0)
