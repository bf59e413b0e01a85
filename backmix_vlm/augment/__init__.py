"""Batch mixers: BackMix over a mask bank, and the Cutout / Mixup / CutMix baselines.

Every mixer is a :class:`Mixer` (what it needs, ``setup``, one call signature), registered by
name in ``MIXERS`` and built with :func:`build_mixer`; see docs/architecture.md, "How to add a
mixer".
"""
from .base import Mixer, MixerSetup, MixResult, alongside
from .factory import MIXERS, build_mixer
from .mask_bank import MaskBank, topk_foreground
from .backmix import BackMix  # noqa: E402  (registers "backmix")
from .baselines import Cutout, CutMix, Mixup, NoMix  # registers the baselines

__all__ = [
    "MIXERS", "BackMix", "CutMix", "Cutout", "MaskBank", "MixResult", "Mixer", "MixerSetup", "Mixup", "NoMix",
    "alongside", "build_mixer", "topk_foreground",
]
