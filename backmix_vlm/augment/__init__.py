"""Batch mixers: BackMix over a mask bank, and the Cutout / Mixup / CutMix baselines.

Every mixer is called as ``mixer(images, labels, indices) -> MixResult`` and built by name
with :func:`build_mixer` (registry ``MIXERS``).
"""
from .base import MixResult, alongside
from .factory import MIXERS, build_mixer
from .mask_bank import MaskBank, topk_foreground
from .backmix import BackMix  # noqa: E402  (registers "backmix")
from .baselines import Cutout, CutMix, Mixup, NoMix  # registers the baselines

__all__ = [
    "MIXERS", "BackMix", "CutMix", "Cutout", "MaskBank", "MixResult", "Mixup", "NoMix",
    "alongside", "build_mixer", "topk_foreground",
]
