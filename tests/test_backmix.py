"""MaskBank, BackMix (paper Eq. 3 / 4) and the Cutout / Mixup / CutMix baselines."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from backmix_vlm.augment import (MIXERS, BackMix, CutMix, Cutout, MaskBank, MixerSetup, Mixup, MixResult,
                                 NoMix, alongside, build_mixer, topk_foreground)
from backmix_vlm.config import AugmentConfig, BackMixConfig
from backmix_vlm.errors import BackmixError, ConfigError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = 8, size: tuple[int, int] = (32, 32), seed: int = 0):
    g = gen(seed)
    images = torch.randn(b, 3, *size, generator=g)
    labels = torch.arange(b) % 4
    indices = torch.randperm(20, generator=g)[:b]
    return images, labels, indices


def trained_bank(n: int = 20, size: tuple[int, int] = (8, 8), seed: int = 1) -> MaskBank:
    """A bank whose rows are distinct continuous maps (no ties), as after some training."""
    bank = MaskBank(n, size)
    bank.update(torch.arange(n), torch.rand(n, *size, generator=gen(seed)))
    return bank


def upsample_nearest(masks: torch.Tensor, factor_h: int, factor_w: int) -> torch.Tensor:
    return masks.repeat_interleave(factor_h, dim=1).repeat_interleave(factor_w, dim=2)


# ----------------------------------------------------------------------------- mask bank
def test_bank_initial_state_is_uniform_buffer_in_state_dict():
    bank = MaskBank(5, (4, 6))
    assert bank.bank.shape == (5, 4, 6) and torch.all(bank.bank == 0.5)
    state = bank.state_dict()
    assert set(state) == {"bank"}
    other = MaskBank(5, (4, 6))
    trained = trained_bank(5, (4, 6))
    other.load_state_dict(trained.state_dict())
    assert torch.equal(other.bank, trained.bank)


def test_bank_ema_weight_is_momentum_of_the_new_map():
    bank = MaskBank(4, (2, 2), momentum=0.25)
    bank.update(torch.tensor([1, 3]), torch.stack([torch.ones(2, 2), torch.zeros(2, 2)]))
    # 0.25 * 1 + 0.75 * 0.5 = 0.625 ; 0.25 * 0 + 0.75 * 0.5 = 0.375 (exact in binary)
    assert torch.all(bank.bank[1] == 0.625) and torch.all(bank.bank[3] == 0.375)
    assert torch.all(bank.bank[[0, 2]] == 0.5)
    bank.update(torch.tensor([1]), torch.zeros(1, 2, 2))
    assert torch.all(bank.bank[1] == 0.75 * 0.625)

    paper = MaskBank(1, (1, 1))  # beta = 0.1 by default
    paper.update(torch.tensor([0]), torch.full((1, 1, 1), 0.8))
    assert paper.bank.item() == pytest.approx(0.1 * 0.8 + 0.9 * 0.5, abs=1e-7)


def test_bank_duplicate_indices_take_one_step_with_the_mean_map():
    bank = MaskBank(3, (1, 2), momentum=0.25)
    maps = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]], [[0.0, 1.0]]])
    bank.update(torch.tensor([2, 0, 2]), maps)
    # row 2: mean of [1, 0] and [0, 1] = [0.5, 0.5] -> stays 0.5; row 0: 0.25*0.5+0.75*0.5
    assert torch.equal(bank.bank[2], torch.tensor([[0.5, 0.5]]))
    swapped = MaskBank(3, (1, 2), momentum=0.25)
    swapped.update(torch.tensor([2, 2, 0]), maps[[2, 0, 1]])
    assert torch.equal(bank.bank, swapped.bank)  # batch order does not matter


def test_bank_resizes_maps_area_down_bilinear_up():
    down = MaskBank(2, (4, 4), momentum=1.0)
    maps = torch.rand(2, 8, 8, generator=gen())
    down.update(torch.tensor([0, 1]), maps)
    torch.testing.assert_close(down.bank, F.avg_pool2d(maps[:, None], 2)[:, 0])
    up = MaskBank(2, (8, 8), momentum=1.0)
    small = torch.rand(2, 4, 4, generator=gen())
    up.update(torch.tensor([0, 1]), small[:, None])  # (B, 1, h, w) is accepted too
    ref = F.interpolate(small[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up.bank, ref)


def test_bank_reads_are_copies_and_mixing_never_modifies_it():
    bank = trained_bank()
    before = bank.bank.clone()
    rows = bank.get(torch.tensor([0, 1, 2]))
    rows.mul_(0).add_(7)
    fg = bank.foreground(torch.tensor([3, 4]), 0.25)
    fg.fill_(3)
    images, labels, indices = batch()
    for same in (True, False):
        BackMix(bank, same_location=same, generator=gen())(images, labels, indices)
    assert torch.equal(bank.bank, before)


def test_bank_rejects_bad_input():
    with pytest.raises(ConfigError, match="backmix.momentum"):
        MaskBank(3, (2, 2), momentum=1.5)
    with pytest.raises(BackmixError, match="num_samples"):
        MaskBank(0, (2, 2))
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        MaskBank(3, (2, 2)).update(torch.tensor([3]), torch.zeros(1, 2, 2))


def test_topk_foreground_marks_exactly_the_top_k_cells():
    maps = torch.rand(5, 8, 8, generator=gen())
    for ratio, k in ((0.25, 16), (0.1, 6), (0.0, 0), (1.0, 64)):  # 6.4 -> 6 (half-up rounding)
        fg = topk_foreground(maps, ratio)
        assert torch.equal(fg.sum((1, 2)), torch.full((5,), float(k)))
        if 0 < k < 64:
            chosen = maps.masked_fill(fg == 0, float("inf")).flatten(1).min(1).values
            rest = maps.masked_fill(fg == 1, -float("inf")).flatten(1).max(1).values
            assert torch.all(chosen > rest)
    const = topk_foreground(torch.full((1, 4, 4), 0.5), 0.25)  # ties: raster order
    assert torch.equal(const.flatten(), torch.tensor([1.0] * 4 + [0.0] * 12))


# ----------------------------------------------------------------------------- BackMix
@pytest.mark.parametrize("cut_area,size,side", [(0.25, (32, 32), (16, 16)), (1 / 16, (32, 32), (8, 8)),
                                                 (0.25, (32, 48), (16, 24))])
def test_backmix_box_has_exact_area_and_outside_is_untouched(cut_area, size, side):
    bank = trained_bank(size=(size[0] // 4, size[1] // 4))
    images, labels, indices = batch(size=size)
    res = BackMix(bank, cut_area=cut_area, generator=gen())(images, labels, indices, return_masks=True)
    box = res.extras["box_mask"]
    assert torch.equal(box.sum((1, 2)), torch.full((8,), side[0] * side[1]))
    assert box.sum((1, 2)).float().div(size[0] * size[1]).allclose(torch.tensor(cut_area))
    rows, cols = box.any(2), box.any(1)  # a full rectangle inside the image
    assert torch.all(rows.sum(1) == side[0]) and torch.all(cols.sum(1) == side[1])
    assert torch.equal(box, rows[:, :, None] & cols[:, None, :])
    outside = ~box[:, None].expand_as(images)
    assert torch.equal(res.images[outside], images[outside])
    assert torch.equal(res.labels_a, labels) and res.labels_b is None and res.lam == 1.0


def test_backmix_same_location_matches_eq3_reference():
    bank = trained_bank()
    images, labels, indices = batch()
    res = BackMix(bank, mask_ratio=0.25, generator=gen(3))(images, labels, indices, return_masks=True)
    partner, box = res.extras["partner"], res.extras["box_mask"]
    c_b = upsample_nearest(topk_foreground(bank.bank[indices[partner]], 0.25), 4, 4)
    assert torch.equal(res.extras["fg_mask"].float(), c_b)
    assert torch.all(c_b.mean((1, 2)) == 0.25)  # masked fraction = k of the bank cells
    m, x_b = box[:, None].float(), images[partner]
    expected = m * (1 - c_b[:, None]) * x_b + (1 - m) * images  # Eq. 3
    assert torch.equal(res.images, expected)
    pasted = box & (c_b == 1)
    assert torch.equal(res.extras["pasted_fg"], pasted)
    assert pasted.any() and torch.all(res.images.permute(1, 0, 2, 3)[:, pasted] == 0)
    keep = (box & (c_b == 0))[:, None].expand_as(images)
    assert torch.equal(res.images[keep], x_b[keep])


def test_backmix_independent_source_box_matches_per_sample_reference():
    bank = trained_bank()
    images, labels, indices = batch()
    res = BackMix(bank, cut_area=1 / 16, same_location=False, generator=gen(5))(
        images, labels, indices, return_masks=True)
    partner, boxes = res.extras["partner"], res.extras["box"]
    assert torch.any(boxes[:, :2] != boxes[:, 2:])
    c_b = upsample_nearest(topk_foreground(bank.bank[indices[partner]], 0.25), 4, 4)
    for i in range(images.shape[0]):  # slow reference, one sample at a time
        t, l, st, sl = boxes[i].tolist()
        expected = images[i].clone()
        patch = images[partner[i], :, st:st + 8, sl:sl + 8] * (1 - c_b[i, st:st + 8, sl:sl + 8])
        expected[:, t:t + 8, l:l + 8] = patch
        assert torch.equal(res.images[i], expected)
        pasted = torch.zeros(32, 32, dtype=torch.bool)
        pasted[t:t + 8, l:l + 8] = c_b[i, st:st + 8, sl:sl + 8] == 1
        assert torch.equal(res.extras["pasted_fg"][i], pasted)


def test_backmix_extreme_mask_ratios_are_paste_and_cutout():
    bank = trained_bank()
    images, labels, indices = batch()
    paste = BackMix(bank, mask_ratio=0.0, generator=gen())(images, labels, indices, return_masks=True)
    box = paste.extras["box_mask"][:, None].expand_as(images)
    assert torch.equal(paste.images[box], images[paste.extras["partner"]][box])
    cut = BackMix(bank, mask_ratio=1.0, fill=-1.5, generator=gen())(images, labels, indices, return_masks=True)
    assert torch.all(cut.images[box] == -1.5)  # k = 1 is Cutout (with the given fill)


def test_backmix_is_reproducible_from_the_generator():
    bank = trained_bank()
    images, labels, indices = batch()
    for same in (True, False):
        a = BackMix(bank, same_location=same, pairing="different_class", generator=gen(7))(images, labels, indices)
        b = BackMix(bank, same_location=same, pairing="different_class", generator=gen(7))(images, labels, indices)
        c = BackMix(bank, same_location=same, pairing="different_class", generator=gen(8))(images, labels, indices)
        assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_pairing_random_is_a_permutation_without_fixed_points():
    bank = trained_bank()
    images, labels, indices = batch()
    mixer = BackMix(bank, generator=gen())
    for _ in range(20):
        p = mixer.partners(labels)
        assert torch.equal(p.sort().values, torch.arange(8)) and torch.all(p != torch.arange(8))
    assert mixer.partners(torch.tensor([3])).tolist() == [0]


def test_pairing_different_class_never_pairs_a_class_with_itself_when_possible():
    bank = trained_bank()
    mixer = BackMix(bank, pairing="different_class", generator=gen())
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])  # imbalanced: one dominant class
    seen = set()
    for _ in range(50):
        p = mixer.partners(labels)
        assert torch.all(labels[p] != labels)
        seen.update(p[:6].tolist())
    assert seen == {6, 7}
    single = torch.zeros(5, dtype=torch.long)  # one class: fall back to another sample
    for _ in range(10):
        assert torch.all(mixer.partners(single) != torch.arange(5))


def test_backmix_rejects_bad_options():
    bank = MaskBank(4, (2, 2))
    with pytest.raises(ConfigError, match="backmix.pairing"):
        BackMix(bank, pairing="nearest")
    with pytest.raises(ConfigError, match="backmix.cut_area"):
        BackMix(bank, cut_area=1.5)
    with pytest.raises(ConfigError, match="backmix.mask_ratio"):
        BackMix(bank, mask_ratio=-0.1)


# ----------------------------------------------------------------------------- baselines
def test_cutout_zeroes_one_clipped_square_per_image():
    images, labels, _ = batch(b=64)
    res = Cutout(side=0.5, generator=gen())(images, labels, None, return_masks=True)
    box = res.extras["box_mask"]
    rows, cols = box.any(2).sum(1), box.any(1).sum(1)
    assert torch.equal(box, box.any(2)[:, :, None] & box.any(1)[:, None, :])
    assert rows.min() >= 8 and rows.max() == 16 and cols.min() >= 8 and cols.max() == 16
    assert (rows < 16).any()  # some boxes clipped at the border
    mask = box[:, None].expand_as(images)
    assert torch.all(res.images[mask] == 0) and torch.equal(res.images[~mask], images[~mask])
    assert torch.equal(res.labels_a, labels) and res.labels_b is None


def test_mixup_mixes_images_and_labels_with_one_lambda():
    images, labels, _ = batch()
    res = Mixup(alpha=1.0, generator=gen(2))(images, labels, None, return_masks=True)
    lam, perm = res.lam, res.extras["partner"]
    assert 0.0 < lam < 1.0 and torch.equal(res.labels_b, labels[perm])
    assert torch.equal(res.images, lam * images + (1 - lam) * images[perm])
    again = Mixup(alpha=1.0, generator=gen(2))(images, labels, None)
    assert again.lam == lam and torch.equal(again.images, res.images)
    logits = torch.randn(8, 4, generator=gen())
    manual = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[perm])
    torch.testing.assert_close(res.loss(logits), manual)


def test_cutmix_lambda_is_the_exact_unpasted_area():
    images, labels, _ = batch()
    for seed in range(5):
        res = CutMix(alpha=1.0, generator=gen(seed))(images, labels, None, return_masks=True)
        box, perm = res.extras["box_mask"], res.extras["partner"]
        assert res.lam == 1.0 - box[0].sum().item() / (32 * 32)
        mask = box[:, None].expand_as(images)
        assert torch.equal(res.images[~mask], images[~mask])
        assert torch.equal(res.images[mask], images[perm][mask])
        assert torch.equal(res.labels_b, labels[perm])
    skipped = CutMix(prob=0.0, generator=gen())(images, labels, None)
    assert skipped.labels_b is None and torch.equal(skipped.images, images)


# ----------------------------------------------------------------------------- results, registry
def test_alongside_loss_is_the_mean_of_plain_and_mixed_losses():
    images, labels, indices = batch()
    logits = torch.randn(16, 4, generator=gen())
    for mixer in (Mixup(generator=gen()), CutMix(generator=gen()), BackMix(trained_bank(), generator=gen())):
        mixed = mixer(images, labels, indices)
        both = alongside(images, labels, mixed)
        assert torch.equal(both.images[:8], images) and torch.equal(both.images[8:], mixed.images)
        assert both.extras["num_original"] == 8
        expected = 0.5 * (F.cross_entropy(logits[:8], labels) + mixed.loss(logits[8:]))
        torch.testing.assert_close(both.loss(logits), expected)


def test_soft_targets():
    res = MixResult(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), torch.tensor([2, 1]), 0.75)
    assert torch.equal(res.targets(3), torch.tensor([[0.75, 0.0, 0.25], [0.0, 1.0, 0.0]]))
    per_sample = MixResult(res.images, res.labels_a, res.labels_b, torch.tensor([1.0, 0.5]))
    assert torch.equal(per_sample.targets(3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


def test_build_mixer_by_name():
    assert MIXERS.names() == ["backmix", "cutmix", "cutout", "mixup", "none"]
    cfg = BackMixConfig(cut_area=1 / 16, mask_ratio=0.5, same_location=False, pairing="different_class",
                        mask_source="random")
    mixer = build_mixer("backmix", cfg)
    assert isinstance(mixer, BackMix) and mixer.needs_bank and mixer.bank is None  # the bank comes with setup
    assert (mixer.cut_area, mixer.mask_ratio, mixer.same_location, mixer.pairing, mixer.mask_source) == (
        1 / 16, 0.5, False, "different_class", "random")
    bank, g = MaskBank(4, (2, 2)), gen()
    mixer.setup(MixerSetup(generator=g, bank=bank))
    assert mixer.bank is bank and mixer.generator is g
    assert isinstance(build_mixer("cutout", cfg), Cutout)  # backmix keys are ignored by baselines
    assert build_mixer(AugmentConfig("mixup", {"alpha": 0.2})).alpha == 0.2
    assert build_mixer(AugmentConfig("backmix", {"fill": 0.5})).fill == 0.5
    assert isinstance(build_mixer("none"), NoMix) and not build_mixer("none").mixes
    assert isinstance(build_mixer("backmix", BackMixConfig(enabled=False)), NoMix)  # backmix.enabled: false
    assert isinstance(build_mixer("cutmix", BackMixConfig(enabled=False)), CutMix)  # ... switches BackMix only
    with pytest.raises(ConfigError, match="augment.options: unknown option 'beta' of mixer 'mixup'; accepted: alpha"):
        build_mixer(AugmentConfig("mixup", {"beta": 1.0}))
    with pytest.raises(ConfigError, match="augment.name: 'mixout' is not accepted; choose one of backmix, cutmix"):
        build_mixer("mixout", cfg)
    with pytest.raises(ConfigError, match="BackMix has no mask bank"):
        build_mixer("backmix")(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_oracle_needs_the_true_masks_at_setup():
    mixer = build_mixer("backmix", BackMixConfig(mask_source="oracle"))
    with pytest.raises(ConfigError, match="backmix.mask_source: 'oracle' needs a training set with foreground masks"):
        mixer.setup(MixerSetup(bank=MaskBank(4, (2, 2))))
    masks = torch.zeros(4, 8, 8)
    masks[:, :4] = 1  # the top half is the object
    mixer.setup(MixerSetup(generator=gen(), bank=MaskBank(4, (2, 2)), true_masks=masks))
    res = mixer(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), torch.arange(4), return_masks=True)
    assert torch.equal(res.extras["fg_cells"], masks.bool())  # C_B = the true masks, not the bank


# ----------------------------------------------------------------------------- distributed bank
def _bank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bank = MaskBank(6, (4, 4))
        indices = [torch.tensor([0, 1, 2]), torch.tensor([4, 2])][rank]  # sizes differ, 2 is shared
        maps = torch.full((len(indices), 8, 8), 0.1 * (rank + 1)) + torch.arange(64.0).view(8, 8) / 64
        bank.update(indices, maps)
        torch.save(bank.bank, f"{out_dir}/bank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes (gloo): ~10-15 s
def test_distributed_update_reaches_every_copy(tmp_path):
    mp.spawn(_bank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    b0, b1 = torch.load(tmp_path / "bank0.pt"), torch.load(tmp_path / "bank1.pt")
    assert torch.equal(b0, b1)
    ref = MaskBank(6, (4, 4))  # single process, all maps at once
    grid = torch.arange(64.0).view(8, 8) / 64
    maps = torch.cat([torch.full((3, 8, 8), 0.1), torch.full((2, 8, 8), 0.2)]) + grid
    ref.update(torch.tensor([0, 1, 2, 4, 2]), maps, distributed=False)
    assert torch.equal(b0, ref.bank)
    assert torch.all(b0[[3, 5]] == 0.5) and not torch.equal(b0[2], b0[0])
