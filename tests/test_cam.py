"""cam_foreground: the ground-truth channel of a pixel-wise softmax over class maps."""
from __future__ import annotations

import math

import torch

from backmix_vlm.augment import MaskBank
from backmix_vlm.models.cnn import create_cnn
from backmix_vlm.saliency.cam import cam_foreground


def test_cam_foreground_hand_computed():
    cam = torch.zeros(1, 2, 1, 2)
    cam[0, 1, 0, 0] = math.log(3.0)  # cell 0: softmax [1/4, 3/4]; cell 1: [1/2, 1/2]
    torch.testing.assert_close(cam_foreground(cam, torch.tensor([1])), torch.tensor([[[0.75, 0.5]]]))
    torch.testing.assert_close(cam_foreground(cam, torch.tensor([0])), torch.tensor([[[0.25, 0.5]]]))


def test_cam_foreground_equals_manual_softmax_channel_and_is_a_probability():
    g = torch.Generator().manual_seed(0)
    cam = torch.randn(4, 5, 3, 6, generator=g) * 50  # large logits: still finite, in [0, 1]
    labels = torch.tensor([4, 0, 2, 2])
    fg = cam_foreground(cam, labels)
    manual = torch.stack([torch.exp(cam[i, labels[i]] - cam[i].logsumexp(0)) for i in range(4)])
    torch.testing.assert_close(fg, manual)
    assert fg.shape == (4, 3, 6) and torch.isfinite(fg).all() and fg.min() >= 0 and fg.max() <= 1
    all_classes = sum(cam_foreground(cam, torch.full((4,), k)) for k in range(5))
    torch.testing.assert_close(all_classes, torch.ones(4, 3, 6))


def test_model_cams_feed_the_bank_at_its_resolution():
    torch.manual_seed(0)
    model = create_cnn("small_cnn", 3, width=4).eval()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    with torch.no_grad():
        out = model(images)
    bank = MaskBank(10, model.cam_size(32), momentum=1.0)
    maps = cam_foreground(out.cam, labels)
    bank.update(torch.tensor([7, 3]), maps)
    assert torch.equal(bank.bank[[7, 3]], maps) and torch.all(bank.bank[0] == 0.5)
