"""The mixer is injected: the trainer and the figures use the mixer ``augment.build_mixer`` makes.

* A mixer a user registers in ``augment.MIXERS`` is accepted by a job config and used by the
  trainer — which gives it the bank and the run's random stream because it asks for them — with
  no change to the trainer.
* ``report.figures.mix_with_bank`` mixes with the same mixer as training (``mask_source`` and
  every option honoured): same images, same masks, from the same bank and generator state.
"""
from __future__ import annotations

import pytest
import torch

from backmix_vlm.augment import MIXERS, MaskBank, Mixer, MixerSetup, MixResult, build_mixer
from backmix_vlm.config import AugmentConfig, BackMixConfig, OptimConfig, RunConfig, from_dict
from backmix_vlm.engine.checkpoint import save_checkpoint
from backmix_vlm.engine.tasks import ClassifierTask
from backmix_vlm.engine.trainer import Trainer
from backmix_vlm.errors import ConfigError
from backmix_vlm.models.cnn import create_cnn
from test_resume import tiny_dataset


class Negate(Mixer):
    """A made-up mixer: every image times ``-scale``; it reads the bank to prove it got it."""

    needs_bank = True
    options = ("scale",)
    label = "Negate"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.bank = None
        self.calls: list[tuple[torch.Tensor, object]] = []

    def setup(self, inputs: MixerSetup) -> None:
        super().setup(inputs)
        self.bank = inputs.bank

    def __call__(self, images, labels, indices=None, *, geometry=None, return_masks=False):
        self.calls.append((indices.clone(), geometry))
        self.bank.get(indices)  # a bank row per sample
        return MixResult(-self.scale * images, labels)


@pytest.fixture
def negate(monkeypatch):
    monkeypatch.setattr(MIXERS, "_items", dict(MIXERS._items))  # the registration ends with the test
    MIXERS.register("negate")(Negate)
    return Negate


def test_a_registered_mixer_is_accepted_and_used_by_the_trainer(tmp_path, negate):
    from backmix_vlm.jobs.train import TrainConfig

    cfg = from_dict(TrainConfig, {"augment": {"name": "negate", "options": {"scale": 2.0}},
                                  "backmix": {"mode": "mixed_only"}})
    with pytest.raises(ConfigError, match="augment.options: unknown option 'alpha' of mixer 'negate'"):
        build_mixer(AugmentConfig("negate", {"alpha": 2.0}))
    mixer = build_mixer(cfg.augment, cfg.backmix)  # what the train job does with its config
    assert isinstance(mixer, Negate) and mixer.scale == 2.0

    torch.manual_seed(0)
    model = create_cnn("small_cnn", 3, width=4)
    data = tiny_dataset(8)
    trainer = Trainer(ClassifierTask(model, 16), data, optim=OptimConfig(epochs=1, batch_size=4),
                      run=RunConfig(device="cpu"), run_dir=tmp_path, num_classes=3, mixer=mixer, backmix=cfg.backmix)
    # asked, not guessed: a bank because needs_bank, handed over with the run's random stream
    assert trainer.mixer is mixer and trainer.bank is not None and mixer.bank is trainer.bank
    assert mixer.generator is trainer.mix_generator and trainer.bank.bank.shape[0] == 8

    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    images = torch.stack([data[i][0] for i in range(4)])
    indices = torch.tensor([5, 1, 7, 2])
    trainer.train_step(images, torch.tensor([0, 1, 2, 0]), indices)
    assert torch.equal(seen[0], -2.0 * images)  # mixed_only: the model trained on the mixer's batch
    assert torch.equal(mixer.calls[0][0], indices)
    assert (trainer.bank.bank[indices] != 0.5).any()  # and the bank it asked for was updated


@pytest.mark.parametrize("source", ["bank", "random"])
def test_figures_mix_with_the_training_mixer(tmp_path, source):
    from backmix_vlm.report.figures import mix_with_bank

    data = tiny_dataset(8)
    augment, backmix = AugmentConfig("backmix", {"fill": 1.0}), BackMixConfig(mask_source=source, cut_area=0.5)
    bank = MaskBank(8, (4, 4))
    bank.bank.copy_(torch.rand(8, 4, 4, generator=torch.Generator().manual_seed(1)))
    save_checkpoint(tmp_path / "last.pt", {"bank": bank.state_dict()})
    s = mix_with_bank(data, tmp_path / "last.pt", augment, backmix, seed=7, num=6)
    assert s["mixer"].mask_source == source and s["mixer"].fill == 1.0

    # training's mixer from the same builder, the same bank and a generator in the same state
    g = torch.Generator().manual_seed(7)
    idx = torch.randperm(8, generator=g)[:6]
    mixer = build_mixer(augment, backmix)
    mixer.setup(MixerSetup(generator=g, bank=bank))
    res = mixer(s["targets"], torch.tensor([data.labels[int(i)] for i in idx]), idx, return_masks=True)
    assert torch.equal(s["indices"], idx) and torch.equal(s["partner"], res.extras["partner"])
    assert torch.equal(s["mixed"], res.images) and torch.equal(s["binary"], res.extras["fg_cells"].float())

    from_bank = bank.foreground(idx[s["partner"]], backmix.mask_ratio)
    assert torch.equal(s["binary"], from_bank) == (source == "bank")  # random: not the bank's top-k
    assert (s["binary"].flatten(1).sum(1) == 4).all()  # k = 0.25 of 16 cells either way


def test_figures_draw_nothing_for_a_mixer_without_a_bank(tmp_path):
    from backmix_vlm.report.figures import mix_with_bank

    save_checkpoint(tmp_path / "last.pt", {"bank": MaskBank(8, (4, 4)).state_dict()})
    assert mix_with_bank(tiny_dataset(8), tmp_path / "last.pt", AugmentConfig("cutmix"), BackMixConfig(), 0, 4) is None


def test_config_choices_come_from_the_registries(monkeypatch):
    """``data.views.name`` and ``method.name`` accept exactly what their registries hold, and say so."""
    from backmix_vlm.adapters import ADAPTERS
    from backmix_vlm.augment.geometry import VIEW_SAMPLERS, check_views
    from backmix_vlm.config import ViewsConfig
    from backmix_vlm.jobs.fewshot import MethodConfig

    accepted = ", ".join(["auto", "none", "loader", *VIEW_SAMPLERS.names()])
    with pytest.raises(ConfigError, match=f"data.views.name: 'crop_fiip' is not accepted; choose one of {accepted}$"):
        check_views(ViewsConfig("crop_fiip"))
    monkeypatch.setattr(VIEW_SAMPLERS, "_items", dict(VIEW_SAMPLERS._items))
    VIEW_SAMPLERS.register("my_views")(object)
    check_views(ViewsConfig("my_views"))  # a registered view sampler is a valid name at once
    with pytest.raises(ConfigError, match=f"method.name: 'clip_adapter' is not accepted; choose one of "
                                          f"{', '.join(ADAPTERS.names())}$"):
        from_dict(MethodConfig, {"name": "clip_adapter"}, "method")
