"""backmix_vlm.compat: tested version bounds, the library internals it reaches, and the
one-place-per-idea invariants (each idea defined once in the package)."""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from backmix_vlm import compat

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "backmix_vlm"


def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


# ----------------------------------------------------------------------------- version bounds
def _pyproject_bounds() -> dict[str, tuple[str, str]]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*,\s*<\s*([0-9.]+)", dep.strip())
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def test_pyproject_has_the_tested_bounds_of_every_library_compat_reaches_into():
    bounds = _pyproject_bounds()
    for dist, (low, high) in compat.TESTED.items():
        assert bounds.get(dist) == (low, high), f"pyproject.toml: {dist} should be >={low},<{high}"


def test_installed_versions_are_inside_the_tested_bounds():
    report = compat.version_report()
    assert set(report) == set(compat.TESTED)
    assert compat.untested_versions() == [], report


@pytest.mark.parametrize("version, inside", [
    ("3.3.0", True), ("3.9.1", True), ("4.0.0", False), ("3.2.9", False), ("3.3.0+cpu", True), ("4.0.0rc1", False),
])
def test_in_tested_range_compares_release_numbers(version, inside):
    assert compat.in_tested_range(version, "3.3.0", "4") is inside


# ----------------------------------------------------------------------------- open_clip internals
def test_clip_embed_and_pool_are_open_clips_own_forward(tiny_clip_batch_first):
    """embed -> blocks -> pool -> proj must equal VisionTransformer.forward: what VPT, LoRA and
    the tail pass rely on when they run the tower piece by piece."""
    visual = tiny_clip_batch_first.model.visual
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = compat.clip_embed(visual, x)
        for block in visual.transformer.resblocks:
            tokens = block(tokens)
        pooled, _ = compat.clip_pool(visual, tokens)
        torch.testing.assert_close(pooled @ visual.proj, visual(x), rtol=0, atol=1e-6)


def test_open_clip_config_dir_is_added_once():
    from open_clip import factory

    from backmix_vlm.models.clip import MODEL_CONFIG_DIR

    before = list(factory._MODEL_CONFIG_PATHS)
    compat.add_open_clip_config_dir(MODEL_CONFIG_DIR)
    assert list(factory._MODEL_CONFIG_PATHS) == before  # already there: not appended again


# ----------------------------------------------------------------------------- timm internals
def test_timm_pos_embed_is_timms_own_forward():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            reg_tokens=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.norm_pre(vit.patch_drop(compat.timm_pos_embed(vit, vit.patch_embed(x))))
        for block in vit.blocks:
            tokens = block(tokens)
        torch.testing.assert_close(vit.norm(tokens), vit.forward_features(x), rtol=0, atol=0)


def test_recording_load_state_dict_reports_and_restores():
    original = nn.Module.load_state_dict
    src, dst = nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2))
    with compat.recording_load_state_dict() as reports:
        dst.load_state_dict({"0.weight": src.weight, "extra": src.bias}, strict=False)
    assert nn.Module.load_state_dict is original
    assert reports[0].missing_keys == ["0.bias"] and reports[0].unexpected_keys == ["extra"]
    with pytest.raises(RuntimeError), compat.recording_load_state_dict():
        raise RuntimeError("boom")
    assert nn.Module.load_state_dict is original  # restored after an exception too


# ----------------------------------------------------------------------------- Accelerate internals
def test_reset_accelerate_state_only_when_the_settings_change():
    from accelerate.state import AcceleratorState

    from backmix_vlm.config import RunConfig
    from backmix_vlm.engine.trainer import build_accelerator

    build_accelerator(RunConfig(device="cpu", precision="bf16"))
    compat.reset_accelerate_state("bf16", cpu=True)
    assert AcceleratorState._shared_state  # same settings: kept
    compat.reset_accelerate_state("no", cpu=True)
    assert not AcceleratorState._shared_state  # other precision: forgotten
    acc = build_accelerator(RunConfig(device="cpu", precision="no"))
    assert acc.mixed_precision == "no"


# ----------------------------------------------------------------------------- one place per idea
PRIVATE_REACHES = (r"_MODEL_CONFIG_PATHS", r"\._embeds\(", r"\._pool\(", r"\._pos_embed\(", r"_reset_state\(",
                   r"_shared_state\b", r"mock\.patch")


@pytest.mark.parametrize("pattern", PRIVATE_REACHES)
def test_library_internals_are_reached_only_in_compat(pattern):
    users = [name for name, text in _sources().items() if re.search(pattern, text)]
    assert users == ["backmix_vlm/compat.py"], users


@pytest.mark.parametrize("definition", [
    r"^def resolve_device\(", r"^def autocast\(", r"^def low_precision_dtype\(", r"^def host_reachable\(",
    r"^def hub_reachable\(", r"^def trainable_state_dict\(", r"^def load_trainable_state_dict\(",
    r"^DEFAULT_START_LAYER = ", r"^MIXERS[:=]", r"^def active_mixer\(", r"^def build_mixer\(", r"^def check_choice\(",
    r"^AUTOCAST_PRECISIONS = ", r"^WEIGHT_PRECISIONS = ",
])
def test_each_idea_is_defined_once(definition):
    where = [name for name, text in _sources().items() if re.search(definition, text, re.M)]
    assert len(where) == 1, where


def test_no_second_list_of_names():
    """Choices are named once: no module spells out the mixer, view or adapter registries, or the precision lists, again."""
    lists = {
        "mixers": r"\(\s*\"(none|backmix)\",\s*\"(backmix|cutout)\"",
        "views": r"\"resized_crop_flip\",\s*\"flip\"",
        "adapters": r"\"coop\",\s*\"locoop\",\s*\"vpt\"",
        "autocast precisions": r"\(\s*\"no\",\s*\"bf16\",\s*\"fp16\"\s*\)",
        "low-precision dtype map": r"\"bf16\":\s*torch\.bfloat16",
    }
    for idea, pattern in lists.items():
        where = [name for name, text in _sources().items() if re.search(pattern, text)]
        assert len(where) <= 1, f"{idea}: {where}"


def test_validation_helpers_are_imported_from_validation():
    users = [name for name, text in _sources().items()
             if re.search(r"from \.+config import[^\n]*\bcheck_", text)]
    assert users == []


def test_mixer_names_are_the_registry():
    """``augment.name`` accepts exactly the registered mixers, with no list of names anywhere else."""
    from backmix_vlm.augment import MIXERS, build_mixer
    from backmix_vlm.config import active_mixer

    for name in MIXERS.names():
        assert build_mixer(name) is not None
    assert active_mixer("backmix", False) == "none" and active_mixer("backmix", True) == "backmix"
    assert active_mixer("cutmix", False) == "cutmix"  # backmix.enabled only switches BackMix


def test_start_layer_default_is_the_saliency_one():
    from backmix_vlm.engine.adapter_task import SaliencyConfig
    from backmix_vlm.saliency.relevance import DEFAULT_START_LAYER, AttentionRelevance

    assert SaliencyConfig().start_layer == DEFAULT_START_LAYER
    assert inspect.signature(AttentionRelevance).parameters["start_layer"].default == DEFAULT_START_LAYER


def test_precision_names_map_to_one_dtype_table():
    from backmix_vlm.models.frozen import frozen_compute_dtype
    from backmix_vlm.runtime import AUTOCAST_PRECISIONS, WEIGHT_PRECISIONS, autocast, low_precision_dtype

    assert AUTOCAST_PRECISIONS[0] == "auto"  # resolved per device first (runtime.resolve_precision), no dtype of its own
    assert [low_precision_dtype(p) for p in AUTOCAST_PRECISIONS[1:]] == [None, torch.bfloat16, torch.float16]
    assert [low_precision_dtype(p) for p in WEIGHT_PRECISIONS] == [None, torch.float16, torch.bfloat16]
    assert frozen_compute_dtype("bf16") is low_precision_dtype("bf16")
    with autocast("cpu", "bf16"):
        assert torch.get_autocast_dtype("cpu") is low_precision_dtype("bf16")
