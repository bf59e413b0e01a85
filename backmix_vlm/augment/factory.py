"""Mixers by name: the registry ``MIXERS`` and the one builder, :func:`build_mixer`.

The registry is the one list of mixer names: ``augment.name`` of the train and fewshot jobs
accepts exactly its keys, and a mixer registered by a user is accepted everywhere.
:func:`~backmix_vlm.config.active_mixer` is the one rule for how ``augment.name`` and
``backmix.enabled`` combine.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import AugmentConfig, BackMixConfig, active_mixer
from ..errors import ConfigError
from ..registry import Registry
from ..validation import check_choice

if TYPE_CHECKING:
    from .base import Mixer

MIXERS: Registry[type["Mixer"]] = Registry("mixer")


def build_mixer(augment: AugmentConfig | str, backmix: BackMixConfig | None = None) -> "Mixer":
    """The mixer an ``augment`` section (or a bare name) asks for, with the ``backmix`` section.

    The one builder of every job (train, fewshot) and of the figures drawn from a run, so they
    all mix alike.  ``backmix.enabled: false`` with ``augment.name: backmix`` gives ``none``.
    ``augment.options`` must be keys of the mixer's ``options``.  The result still needs
    :meth:`~backmix_vlm.augment.base.Mixer.setup` (the trainer calls it).
    """
    if isinstance(augment, str):
        augment = AugmentConfig(name=augment)
    backmix = backmix if backmix is not None else BackMixConfig()
    check_choice(augment.name, MIXERS.names(), "augment.name")  # the built-in ones registered on import
    cls = MIXERS.get(active_mixer(augment.name, backmix.enabled))
    options = dict(augment.options or {})
    unknown = [k for k in options if k not in cls.options]
    if unknown:
        raise ConfigError(f"augment.options: unknown option '{unknown[0]}' of mixer '{augment.name}'; "
                          f"accepted: {', '.join(cls.options) or 'none'}")
    return cls.from_config(options, backmix)

