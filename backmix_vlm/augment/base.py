"""The batch-mixer interface (:class:`Mixer`), what every mixer returns, and shared helpers.

A mixer declares what it needs and is called one way::

    mixer.needs_bank                    # the trainer makes / updates / checkpoints a MaskBank for it
    mixer.setup(MixerSetup(...))        # once, before the first batch (generator, bank, true masks)
    result = mixer(images, labels, indices, geometry=geometry)
    out = model(result.images)
    loss = result.loss(out.logits)

``lam`` is a float (one weight for the whole batch: Mixup, CutMix) or a per-sample tensor
(after :func:`alongside`, or for mixers that draw one λ per sample).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor


Criterion = Callable[..., Tensor]


@dataclass
class MixResult:
    """A mixed batch: ``loss = lam * CE(labels_a) + (1 - lam) * CE(labels_b)``.

    images:   (B, C, H, W) the batch to train on.
    labels_a: (B,) the label with weight ``lam`` (BackMix: the target image's label).
    labels_b: (B,) the partner's label with weight ``1 - lam``; None when labels are not mixed.
    lam:      float, or a (B,) tensor of per-sample weights.
    extras:   optional tensors for tests and visualisation (e.g. ``box_mask``, ``fg_mask``,
              ``partner``); only filled when a mixer is called with ``return_masks=True``.
    """

    images: Tensor
    labels_a: Tensor
    labels_b: Tensor | None = None
    lam: float | Tensor = 1.0
    extras: dict[str, Any] = field(default_factory=dict)

    def loss(self, logits: Tensor, criterion: Criterion = F.cross_entropy) -> Tensor:
        """Mean over the batch of ``lam * crit(labels_a) + (1 - lam) * crit(labels_b)``.

        With a per-sample ``lam`` the criterion is called with ``reduction="none"`` so each
        sample is weighted by its own λ before the mean.
        """
        if self.labels_b is None:
            return criterion(logits, self.labels_a)
        if isinstance(self.lam, Tensor):
            lam = self.lam.to(device=logits.device, dtype=logits.dtype)
            loss_a = criterion(logits, self.labels_a, reduction="none")
            loss_b = criterion(logits, self.labels_b, reduction="none")
            return (lam * loss_a + (1.0 - lam) * loss_b).mean()
        lam = float(self.lam)
        if lam == 1.0:
            return criterion(logits, self.labels_a)
        return lam * criterion(logits, self.labels_a) + (1.0 - lam) * criterion(logits, self.labels_b)

    def targets(self, num_classes: int) -> Tensor:
        """Soft targets (B, num_classes): ``lam * onehot(a) + (1 - lam) * onehot(b)``."""
        soft = F.one_hot(self.labels_a, num_classes).float()
        if self.labels_b is None:
            return soft
        lam = torch.as_tensor(self.lam, dtype=soft.dtype, device=soft.device)
        lam = lam[:, None] if lam.ndim else lam
        return lam * soft + (1.0 - lam) * F.one_hot(self.labels_b, num_classes).float()

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class MixerSetup:
    """What the trainer (or a figure) hands a mixer once, before the first batch.

    generator:  the run's mixer random stream (checkpointed by the trainer, so a resume replays it).
    bank:       the :class:`~backmix_vlm.augment.mask_bank.MaskBank` the trainer keeps updated; given
                exactly when ``mixer.needs_bank``.
    true_masks: the training set's true foreground masks (N, H, W), when the dataset has them.
    device:     where the batches will be.
    """

    generator: torch.Generator | None = None
    bank: Any = None
    true_masks: Tensor | None = None
    device: torch.device = torch.device("cpu")


class Mixer:
    """Base class of the batch mixers (registered by name in ``augment.MIXERS``).

    A mixer declares what it needs as class attributes; the trainer asks, never guesses:

    * ``needs_bank``: the mixer reads a mask bank (one foreground map per training sample); the
      trainer makes it (task's saliency size, ``backmix.momentum``), updates it from the training
      maps, checkpoints it and hands it over in :meth:`setup`.
    * ``mixes``: False for the identity (plain training: the trainer then trains on the clean batch).
    * ``options``: the keys accepted in ``augment.options`` (constructor keywords).
    * ``label``: the name in results tables ("" for none).

    :meth:`from_config` builds it from ``augment.options`` and the ``backmix`` section;
    :meth:`setup` receives a :class:`MixerSetup`; ``__call__(images, labels, indices, *,
    geometry=None, return_masks=False) -> MixResult`` mixes a normalised (B, C, H, W) batch
    (``indices``: the samples' dataset rows; ``geometry``: each image's view of its canonical
    image, or None).  All randomness comes from ``self.generator``.
    """

    needs_bank: ClassVar[bool] = False
    mixes: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ()
    label: ClassVar[str] = ""
    generator: torch.Generator | None = None

    @classmethod
    def from_config(cls, options: dict[str, Any], backmix: Any) -> "Mixer":
        """The mixer from ``augment.options`` (already checked against ``options``) and the
        ``backmix`` section (a :class:`~backmix_vlm.config.BackMixConfig`; baselines ignore it)."""
        return cls(**options)

    def setup(self, inputs: MixerSetup) -> None:
        """Take what the run provides (the trainer calls this once, before the first batch)."""
        self.generator = inputs.generator

    def __call__(self, images: Tensor, labels: Tensor, indices: Tensor | None = None, *,
                 geometry: Any = None, return_masks: bool = False) -> MixResult:
        raise NotImplementedError


def alongside(images: Tensor, labels: Tensor, result: MixResult) -> MixResult:
    """Train on the originals and the mixed samples in ONE batch (the paper's default).

    Returns a 2B batch: rows ``[:B]`` are the originals (weight λ = 1 on their own label),
    rows ``[B:]`` the mixed samples.  λ becomes a per-sample tensor when the mixer mixes
    labels, so :meth:`MixResult.loss` equals the average of the plain loss and the mixed
    loss exactly, also for Mixup / CutMix; one forward pass keeps BatchNorm statistics over
    both halves, as in the official code.  ``extras["num_original"] = B`` tells the engine
    which rows to use for the mask-bank update (the CAMs of the unmixed images).
    """
    b = images.shape[0]
    if result.images.shape[0] != b:
        raise ValueError(f"alongside: {b} originals but {result.images.shape[0]} mixed samples")
    mixed_images = torch.cat([images, result.images.to(images.dtype)], dim=0)
    labels_a = torch.cat([labels, result.labels_a], dim=0)
    extras = {**result.extras, "num_original": b}
    if result.labels_b is None:
        return MixResult(mixed_images, labels_a, None, 1.0, extras)
    lam_mixed = result.lam if isinstance(result.lam, Tensor) else torch.full((b,), float(result.lam))
    lam = torch.cat([torch.ones(b, device=labels.device), lam_mixed.to(labels.device).float()])
    labels_b = torch.cat([labels, result.labels_b], dim=0)
    return MixResult(mixed_images, labels_a, labels_b, lam, extras)


# ----------------------------------------------------------------------------- shared helpers
def check_fraction(value: float, name: str, *, low_open: bool = False, owner: str = "backmix") -> float:
    """Validate a fraction in [0, 1] (or (0, 1] with ``low_open``) for a user-facing key."""
    from ..validation import check_fraction as check

    check(value, f"{owner}.{name}", low_open=low_open)
    return float(value)


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved to ``device``.

    Drawing on the generator's own device keeps a CPU generator usable (and reproducible)
    for CUDA batches; the tensors drawn are tiny (a few numbers per sample).
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def randperm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


def box_mask(top: Tensor, left: Tensor, height: Tensor | int, width: Tensor | int,
             size: tuple[int, int]) -> Tensor:
    """(B, H, W) bool masks of the boxes ``[top, top+height) x [left, left+width)``.

    Built from two ``arange`` comparisons per axis: no loop over samples.  ``height`` and
    ``width`` may be per-sample tensors; boxes are clipped to the image by construction.
    """
    h, w = size
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    height = torch.as_tensor(height, device=top.device)
    width = torch.as_tensor(width, device=top.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + height).reshape(-1, 1))
    in_cols = (cols >= left[:, None]) & (cols < (left + width).reshape(-1, 1))
    return in_rows[:, :, None] & in_cols[:, None, :]


def randint(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``n`` integers uniform in ``[0, high)``, drawn on the generator's device."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)


def sample_beta(alpha: float, generator: torch.Generator | None) -> float:
    """One draw of Beta(alpha, alpha), seeded from the torch generator (or torch's global RNG).

    ``torch.distributions.Beta`` cannot take a generator, so a numpy generator is seeded with
    a number drawn from the torch one: the whole mixer stays reproducible from one seed.
    """
    import numpy as np

    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))
