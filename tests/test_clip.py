"""open_clip loading, the tiny CLIP, LoCoOp local features and the zero-shot head."""
from __future__ import annotations

import time

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from backmix_vlm.errors import ModelError
from backmix_vlm.models import clip as clip_mod
from backmix_vlm.models.clip import (
    OFFLINE_ENV,
    TINY_CLIP,
    ClipZeroShotClassifier,
    encode_image_global_local,
    load_clip,
    resolve_templates,
)
from backmix_vlm.models.output import ModelOutput


@pytest.fixture(scope="module")
def tiny(tiny_clip):  # built once per session (conftest.py)
    return tiny_clip


@pytest.fixture()
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g)


# ----------------------------------------------------------------------------- loading
def test_tiny_clip_registered_with_open_clip_and_matches_config(tiny):
    assert TINY_CLIP in open_clip.list_models()
    m = tiny.model
    assert m.visual.transformer.width == 64 and len(m.visual.transformer.resblocks) == 2
    assert m.visual.patch_size == (8, 8) and m.visual.image_size == (32, 32)
    assert m.visual.transformer.resblocks[0].attn.num_heads == 4
    assert m.transformer.width == 64 and len(m.transformer.resblocks) == 2
    assert m.context_length == 77 and m.vocab_size == 49408
    assert m.visual.proj.shape == (64, 32) and m.text_projection.shape == (64, 32)


def test_bundle_is_frozen_eval_and_complete(tiny):
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.image_size == 32 and tiny.name == TINY_CLIP and tiny.pretrained is None
    assert tiny.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert tiny.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    tokens = tiny.tokenizer(["a photo of a cat."])
    assert tokens.shape == (1, 77)
    from PIL import Image

    x = tiny.preprocess_eval(Image.new("RGB", (40, 50), (255, 0, 0)))
    assert x.shape == (3, 32, 32)
    # red pixel normalised with the bundle's mean/std
    assert x[0, 0, 0].item() == pytest.approx((1 - tiny.mean[0]) / tiny.std[0], abs=1e-4)
    assert tiny.preprocess_train(Image.new("RGB", (40, 50))).shape == (3, 32, 32)


def test_random_init_is_deterministic_given_manual_seed():
    torch.manual_seed(123)
    a = load_clip(TINY_CLIP, pretrained=None).model.state_dict()
    torch.manual_seed(123)
    b = load_clip(TINY_CLIP, pretrained=None).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _activations(model) -> set[type]:
    blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
    return {type(b.mlp.gelu) for b in blocks}


@pytest.mark.slow  # builds a ViT-B/16-sized model: several seconds on a small CPU
def test_vit_b16_openai_tag_builds_with_quickgelu():
    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai")["quick_gelu"] is True
    bundle = load_clip("ViT-B-16", pretrained="openai", load_weights=False)  # random init, no download
    assert _activations(bundle.model) == {open_clip.transformer.QuickGELU}
    assert bundle.model.visual.transformer.width == 768 and len(bundle.model.visual.transformer.resblocks) == 12
    assert bundle.image_size == 224 and bundle.pretrained is None
    assert bundle.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)


def test_without_quickgelu_tag_the_config_activation_is_kept(tiny):
    # no tag (or a laion tag, trained with nn.GELU): the architecture's own nn.GELU
    assert not open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k").get("quick_gelu", False)
    assert _activations(tiny.model) == {torch.nn.GELU}


def test_unknown_model_name_lists_similar_names():
    with pytest.raises(ModelError, match=r"unknown open_clip model 'ViT-B-61'.*ViT-B-16"):
        load_clip("ViT-B-61", pretrained=None)


def test_unknown_tag_lists_available_tags():
    with pytest.raises(ModelError, match=r"unknown pretrained tag 'openia'.*openai"):
        load_clip("ViT-B-16", pretrained="openia")


def test_bad_precision_rejected():
    with pytest.raises(ModelError, match="precision 'fp64'.*fp32, fp16, bf16"):
        load_clip(TINY_CLIP, pretrained=None, precision="fp64")


def test_offline_without_cache_fails_fast_with_instructions(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv(OFFLINE_ENV, "1")
    before = constants.HF_HUB_OFFLINE
    t0 = time.monotonic()
    with pytest.raises(ModelError) as info:
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    assert "huggingface.co is unreachable" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "model.checkpoint=" in msg and "'ViT-B-16' / 'openai'" in msg
    assert constants.HF_HUB_OFFLINE == before  # temporary offline switch is restored


def test_hub_probe_honours_offline_env(monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    t0 = time.monotonic()
    assert clip_mod.hub_reachable() is False
    assert time.monotonic() - t0 < 1


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_checkpoint_roundtrip_loads_weights(tiny, tmp_path, suffix):
    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif suffix == ".bin":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)  # DDP-style
    else:
        torch.save(sd, path)
    torch.manual_seed(999)  # different random init underneath
    loaded = load_clip(TINY_CLIP, pretrained=None, checkpoint=str(path))
    assert loaded.pretrained == str(path)
    out = loaded.model.state_dict()
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_checkpoint_from_other_architecture_is_model_error(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_clip(TINY_CLIP, pretrained=None, checkpoint=str(path))
    msg = str(info.value)
    assert str(path) in msg and "missing" in msg and "unexpected" in msg
    n_model = len(load_clip(TINY_CLIP, pretrained=None).model.state_dict())
    n_resnet = len(torch.load(path))
    assert f"{n_model} missing and {n_resnet} unexpected keys" in msg
    assert "accepted:" in msg


def test_checkpoint_with_wrong_shapes_is_model_error(tiny, tmp_path):
    sd = dict(tiny.model.state_dict())
    sd["visual.proj"] = torch.zeros(64, 16)
    path = tmp_path / "shapes.pt"
    torch.save(sd, path)
    with pytest.raises(ModelError, match=r"shapes\.pt.*visual\.proj"):
        load_clip(TINY_CLIP, pretrained=None, checkpoint=str(path))


@pytest.mark.parametrize("payload", [b"not a checkpoint at all", None])
def test_unreadable_or_non_tensor_checkpoint_is_model_error(tmp_path, payload):
    path = tmp_path / "junk.pt"
    if payload is None:
        torch.save({"a": 1, "b": "text"}, path)
    else:
        path.write_bytes(payload)
    with pytest.raises(ModelError, match=r"junk\.pt.*accepted"):
        load_clip(TINY_CLIP, pretrained=None, checkpoint=str(path))


def test_missing_checkpoint_file():
    with pytest.raises(ModelError, match="file not found: /nope/x.pt"):
        load_clip(TINY_CLIP, pretrained=None, checkpoint="/nope/x.pt")


# ----------------------------------------------------------------------------- local features
def _reference_global_local(model, x):
    """Step-by-step reimplementation (no hooks) of CLIP's ViT + LoCoOp's local value path."""
    v = model.visual
    t = v.conv1(x).flatten(2).transpose(1, 2)
    cls = v.class_embedding.expand(t.shape[0], 1, -1)
    t = v.ln_pre(torch.cat([cls, t], 1) + v.positional_embedding)
    blocks = v.transformer.resblocks

    def run(blk, t):  # the blocks take (N, L, D) or (L, N, D) depending on the model's layout
        return blk(t) if v.transformer.batch_first else blk(t.transpose(0, 1)).transpose(0, 1)

    for blk in blocks[:-1]:
        t = run(blk, t)
    last = blocks[-1]
    # local: LoCoOp's v path on the last block's input (per token, no attention mixing)
    width = t.shape[-1]
    y = last.ln_1(t)
    qkv = y @ last.attn.in_proj_weight.T + last.attn.in_proj_bias
    val = qkv[..., 2 * width:]
    val = val @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    val = val + t
    val = val + last.mlp(last.ln_2(val))
    local = v.ln_post(val[:, 1:]) @ v.proj
    # global: full block, class token
    t = run(last, t)
    glob = v.ln_post(t[:, 0]) @ v.proj
    return glob, local


def test_global_part_is_bit_identical_to_encode_image(tiny, images):
    with torch.no_grad():
        g, loc = encode_image_global_local(tiny.model, images)
        ref = tiny.model.encode_image(images)
    assert torch.equal(g, ref)
    assert loc.shape == (3, 16, 32)


def test_local_part_matches_step_by_step_reference(tiny, images):
    with torch.no_grad():
        g, loc = encode_image_global_local(tiny.model, images)
        g_ref, loc_ref = _reference_global_local(tiny.model, images)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loc, loc_ref, rtol=1e-5, atol=1e-5)
    # the local tokens differ from what full attention would give (no mixing)
    with torch.no_grad():
        tokens = tiny.model.visual.transformer(tiny.model.visual._embeds(images))
        mixed = tiny.model.visual.ln_post(tokens[:, 1:]) @ tiny.model.visual.proj
    assert not torch.allclose(loc, mixed, atol=1e-3)


@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
def test_block_layout_changes_nothing_but_speed(images, layout):
    torch.manual_seed(0)
    ref = load_clip(TINY_CLIP, pretrained=None, layout="batch_first")
    torch.manual_seed(0)
    other = load_clip(TINY_CLIP, pretrained=None, layout=layout)
    assert other.model.visual.transformer.batch_first == (layout == "batch_first")
    with torch.no_grad():
        torch.testing.assert_close(other.model.encode_image(images), ref.model.encode_image(images), rtol=1e-5, atol=1e-5)
        tokens = ref.tokenizer(["a photo of a cat."])
        torch.testing.assert_close(other.model.encode_text(tokens), ref.model.encode_text(tokens), rtol=1e-5, atol=1e-5)
        for a, b in zip(encode_image_global_local(other.model, images), encode_image_global_local(ref.model, images)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="layout 'nchw' is not accepted"):
        load_clip(TINY_CLIP, pretrained=None, layout="nchw")


def test_local_features_leave_no_hooks_and_accept_visual_tower(tiny, images):
    blk = tiny.model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        g1, l1 = encode_image_global_local(tiny.model, images)
        g2, l2 = encode_image_global_local(tiny.model.visual, images)
    assert not blk._forward_pre_hooks
    assert torch.equal(g1, g2) and torch.equal(l1, l2)


def test_local_features_backpropagate(tiny, images):
    x = images.clone().requires_grad_(True)
    _, loc = encode_image_global_local(tiny.model, x)
    loc.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_local_features_reject_non_vit():
    with pytest.raises(ModelError, match="VisionTransformer"):
        encode_image_global_local(torch.nn.Linear(2, 2), torch.zeros(1, 2))


# ----------------------------------------------------------------------------- zero-shot head
def test_templates_resolution():
    assert resolve_templates("simple") == ("a photo of a {}.",)
    assert len(resolve_templates("cifar_ensemble")) == 18
    assert resolve_templates("a {} in the wild") == ("a {} in the wild",)
    with pytest.raises(ModelError, match="cifar_ensemble"):
        resolve_templates("nope")
    with pytest.raises(ModelError, match="placeholder"):
        resolve_templates(["no placeholder"])


def test_classifier_logits_are_scaled_cosines(tiny, images):
    names = ["cat", "dog", "truck"]
    clf = ClipZeroShotClassifier(tiny, names, templates="cifar_ensemble")
    with torch.no_grad():
        out = clf(images)
    assert isinstance(out, ModelOutput)
    m = tiny.model
    # text features: per template unit vectors, averaged, renormalised (hand computation)
    with torch.no_grad():
        tmpl = resolve_templates("cifar_ensemble")
        txt = torch.stack([
            F.normalize(F.normalize(m.encode_text(tiny.tokenizer([t.format(n) for t in tmpl])), dim=-1).mean(0), dim=0)
            for n in names
        ])
        img = m.encode_image(images)
    torch.testing.assert_close(clf.text_features, txt, rtol=1e-5, atol=1e-6)
    cos = F.normalize(img, dim=-1) @ txt.T
    scale = m.logit_scale.exp()
    torch.testing.assert_close(out.cosine, cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, scale * out.cosine)
    assert torch.equal(out.features, img)
    assert out.local_cosine.shape == (3, 16, 3)
    torch.testing.assert_close(out.local_logits, scale * out.local_cosine)
    assert out.cosine.abs().max() <= 1 + 1e-6 and out.local_cosine.abs().max() <= 1 + 1e-6


def test_classifier_default_template_and_empty_classes(tiny):
    clf = ClipZeroShotClassifier(tiny, ["cat"])
    assert clf.templates == ("a photo of a {}.",)
    assert clf.text_features.shape == (1, 32)
    with pytest.raises(ModelError):
        ClipZeroShotClassifier(tiny, [])
