"""Per-sample RandAugment / TrivialAugment on the device equal torchvision's transforms per image."""
import pytest
import torch
import torchvision.transforms.v2 as T

from backmix_vlm.augment.autoaugment import (GEOMETRIC_OPS, POLICIES, RANDAUGMENT_SPACE, TRIVIALAUGMENT_SPACE,
                                             BatchAutoAugment)
from backmix_vlm.augment.geometry import RandomCropFlip, ViewGeometry, build_views
from backmix_vlm.errors import ConfigError


@pytest.mark.parametrize("ours, theirs", [(RANDAUGMENT_SPACE, T.RandAugment), (TRIVIALAUGMENT_SPACE, T.TrivialAugmentWide)])
def test_spaces_equal_torchvision(ours, theirs):
    ref = theirs._AUGMENTATION_SPACE
    assert list(ours) == list(ref)
    for op, (fn, signed) in ours.items():
        rfn, rsigned = ref[op]
        assert signed == rsigned, op
        if fn is None:
            assert rfn(31, 32, 32) is None, op
        else:
            assert torch.equal(fn(31, 32, 32), rfn(31, 32, 32)), op


def _reference(images, aug, rounds):
    """Each image through torchvision's own op application with the magnitude our draw gave it."""
    tv = T.RandAugment() if aug.policy == "randaugment" else T.TrivialAugmentWide()
    out = []
    for i, img in enumerate(images):
        for op_idx, bins, sign in rounds:
            name = aug.ops[int(op_idx[i])]
            fn, signed = POLICIES[aug.policy][name]
            m = 0.0 if fn is None else float(fn(31, 32, 32)[int(bins[i])]) * (float(sign[i]) if signed else 1.0)
            img = tv._apply_image_or_video_transform(img, name, m, interpolation=tv.interpolation, fill=tv._fill)
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize("policy, num_ops, magnitude", [("randaugment", 2, 9), ("randaugment", 1, 6),
                                                          ("trivialaugment", 1, 0)])
def test_batched_equals_torchvision_per_image(policy, num_ops, magnitude):
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    images[:8] = images[:8] // 4 + 100            # low-contrast rows: autocontrast / equalize do work
    aug = BatchAutoAugment(policy, num_ops=num_ops, magnitude=magnitude)
    rounds = aug.draw(96, torch.Generator().manual_seed(0))
    out, kept = aug(images, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, _reference(images, aug, rounds))
    geometric = torch.zeros(96, dtype=torch.bool)
    for op_idx, _, _ in rounds:
        geometric |= torch.tensor([aug.ops[int(k)] in GEOMETRIC_OPS for k in op_idx])
    assert torch.equal(kept, ~geometric)
    assert geometric.any() and (~geometric).any()
    assert not torch.equal(out, images)


def test_frame_kept_zeroes_bank_coverage():
    geometry = RandomCropFlip(padding=2)(4, (32, 32), torch.Generator().manual_seed(0), torch.device("cpu"))
    maps = torch.rand(4, 4, 4)
    _, cov = geometry.to_canonical(maps, (4, 4))
    kept = torch.tensor([True, False, True, False])
    g = ViewGeometry(geometry.boxes, geometry.flip, geometry.shift, kept)
    _, cov_kept = g.to_canonical(maps, (4, 4))
    assert torch.equal(cov_kept[kept], cov[kept]) and cov[kept].sum() > 0
    assert cov_kept[~kept].abs().sum() == 0
    assert torch.equal(g[torch.tensor([1, 2])].frame_kept, torch.tensor([False, True]))


def test_device_views_apply_auto_augment_after_crop():
    views = build_views("crop_flip", {"padding": 2, "auto_augment": {"policy": "randaugment", "num_ops": 1,
                                                                     "magnitude": 6}},
                        mean=[0.5] * 3, std=[0.25] * 3)
    plain = build_views("crop_flip", {"padding": 2}, mean=[0.5] * 3, std=[0.25] * 3)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    x, g = views(images, torch.Generator().manual_seed(3))
    x0, g0 = plain(images, torch.Generator().manual_seed(3))
    assert torch.equal(g.boxes, g0.boxes) and torch.equal(g.flip, g0.flip)   # same crops, then the ops
    assert g.frame_kept is not None and g.frame_kept.dtype == torch.bool
    same = (x == x0).flatten(1).all(1)
    assert not same.all() and same.any()          # some drew Identity (or a no-op magnitude)


def test_bad_options():
    with pytest.raises(ConfigError, match="policy"):
        BatchAutoAugment("autoaugment")
    with pytest.raises(ConfigError, match="num_ops"):
        BatchAutoAugment("trivialaugment", num_ops=2)
    with pytest.raises(ConfigError, match="magnitude"):
        BatchAutoAugment("randaugment", magnitude=31)
    with pytest.raises(ConfigError, match="auto_augment"):
        build_views("crop_flip", {"auto_augment": "randaugment"})
    with pytest.raises(ConfigError, match="uint8"):
        build_views("crop_flip", {"auto_augment": {"policy": "randaugment"}})(torch.rand(2, 3, 8, 8), None)
