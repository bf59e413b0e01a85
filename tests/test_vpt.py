"""VPT over open_clip and timm ViTs: zero-prompt parity, shallow/deep prompt placement, hooks, timm loader."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from backmix_vlm.adapters import VPT, VPTConfig, create_adapter
from backmix_vlm.errors import ConfigError, ModelError
from backmix_vlm.models import vit as vit_mod
from backmix_vlm.models.clip import OFFLINE_ENV, build_text_features
from backmix_vlm.models.vit import load_timm_vit

NAMES = ["cat", "dog", "car", "ship", "frog"]


@pytest.fixture(scope="module")
def tiny(tiny_clip_batch_first):  # built once per session (conftest.py)
    return tiny_clip_batch_first


def _timm_vit(global_pool: str = "token", reg_tokens: int = 0, num_classes: int = 5) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                             reg_tokens=reg_tokens, global_pool=global_pool, num_classes=num_classes).eval()


@pytest.fixture()
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- zero-prompt parity
def test_zero_prompts_reproduce_open_clip_encode_image(tiny, images):
    vpt = VPT(tiny, NAMES, VPTConfig(num_tokens=0, head="zeroshot_text"))
    with torch.no_grad():
        out = vpt(images)
        ref = tiny.model.encode_image(images)
        text = build_text_features(tiny, NAMES)
    assert torch.equal(out.features, ref)  # bit-exact: the same modules in the same order
    torch.testing.assert_close(out.cosine, F.normalize(ref, dim=-1) @ text.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits, tiny.model.logit_scale.exp() * out.cosine)
    # with autograd on (prompts require grad, nn.MultiheadAttention leaves its fast path): <= 1e-6
    torch.testing.assert_close(vpt.forward_features(images), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("global_pool,reg_tokens", [("token", 0), ("avg", 2)])
def test_zero_prompts_reproduce_timm_forward(images, global_pool, reg_tokens):
    base = _timm_vit(global_pool, reg_tokens)
    vpt = VPT(base, NAMES, VPTConfig(num_tokens=0, deep=True))
    with torch.no_grad():
        vpt.head.load_state_dict(base.head.state_dict())
        out = vpt(images)
        ref_feats = base.forward_head(base.forward_features(images), pre_logits=True)
        ref_logits = base(images)
    assert torch.equal(out.features, ref_feats)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-6)
    assert vpt.num_prefix_tokens == 1 + reg_tokens


def test_avg_pool_ignores_prompt_tokens(images):
    """With prompts, avg pooling still averages only the patch tokens (prompts are dropped)."""
    base = _timm_vit("avg", reg_tokens=1)
    vpt = VPT(base, NAMES, VPTConfig(num_tokens=3))
    with torch.no_grad():
        tokens = vpt.forward_tokens(images)
        k = vpt.num_prefix_tokens
        assert k == 1 + 1 + 3 and tokens.shape == (2, k + 16, 32)
        expected = base.forward_head(base.norm(torch.cat([tokens[:, :2], tokens[:, k:]], 1)), pre_logits=True)
        torch.testing.assert_close(vpt.forward_features(images), expected, rtol=0, atol=0)
        patch_mean = base.norm(tokens[:, k:]).mean(1)  # timm avg pool: fc_norm after the mean
        torch.testing.assert_close(expected, base.fc_norm(patch_mean), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- prompt placement
def _block_inputs(vpt, images):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone())) for b in vpt.blocks]
    outs = []
    hooks += [b.register_forward_hook(lambda _m, _a, out: outs.append(out.detach().clone())) for b in vpt.blocks]
    try:
        with torch.no_grad():
            vpt(images)
    finally:
        for h in hooks:
            h.remove()
    return seen, outs


@pytest.mark.parametrize("backbone", ["clip", "timm"])
def test_deep_prompts_replace_previous_outputs_at_every_block(tiny, images, backbone):
    base = tiny if backbone == "clip" else _timm_vit(reg_tokens=2)
    vpt = VPT(base, NAMES, VPTConfig(num_tokens=4, deep=True))
    depth = len(vpt.blocks)
    assert vpt.deep_prompt_embeddings.shape == (depth - 1, 4, vpt.view.width)
    k = vpt.view.num_prefix_tokens
    ins, outs = _block_inputs(vpt, images)
    assert len(ins) == depth
    for i, x in enumerate(ins):
        assert x.shape[1] == vpt.num_prefix_tokens + 16
        prompt = vpt.prompt_embeddings[0] if i == 0 else vpt.deep_prompt_embeddings[i - 1]
        assert torch.equal(x[0, k:k + 4], prompt.detach()) and torch.equal(x[1, k:k + 4], prompt.detach())
        if i > 0:  # prefix and patch tokens carry over from the previous block; prompts are replaced
            assert torch.equal(x[:, :k], outs[i - 1][:, :k])
            assert torch.equal(x[:, k + 4:], outs[i - 1][:, k + 4:])
            assert not torch.equal(x[:, k:k + 4], outs[i - 1][:, k:k + 4])


def test_shallow_prompts_enter_once_after_cls(tiny, images):
    vpt = VPT(tiny, NAMES, VPTConfig(num_tokens=3))
    assert vpt.deep_prompt_embeddings is None
    ins, outs = _block_inputs(vpt, images)
    assert torch.equal(ins[0][:, 1:4], vpt.prompt_embeddings.detach().expand(2, -1, -1))
    with torch.no_grad():
        embeds = tiny.model.visual._embeds(images)
    assert torch.equal(ins[0][:, :1], embeds[:, :1]) and torch.equal(ins[0][:, 4:], embeds[:, 1:])
    assert torch.equal(ins[1], outs[0])  # later blocks see the previous output unchanged


def test_attention_hooks_see_the_prompted_sequence(tiny, images):
    """Saliency hooks the real attention modules: they must run, on prefix + prompts + patches."""
    vpt = VPT(tiny, NAMES, VPTConfig(num_tokens=2, deep=True))
    lengths = []
    handle = vpt.blocks[-1].attn.register_forward_hook(lambda _m, args, _o: lengths.append(args[0].shape[1]))
    try:
        vpt(images)
    finally:
        handle.remove()
    assert lengths == [vpt.num_prefix_tokens + 16] and vpt.num_prefix_tokens == 3
    assert vpt.grid_size(images) == (4, 4)


def test_init_range_dropout_and_zeros():
    base = _timm_vit()
    torch.manual_seed(0)
    vpt = VPT(base, NAMES, VPTConfig(num_tokens=50, deep=True, dropout=0.5))
    val = math.sqrt(6.0 / (3 * 8 * 8 + 32))  # VPT: sqrt(6 / (3 * patch^2 + dim))
    for p in (vpt.prompt_embeddings, vpt.deep_prompt_embeddings):
        assert p.abs().max() <= val and p.abs().max() > 0.9 * val
    assert abs(vpt.prompt_embeddings.std().item() - val / math.sqrt(3)) < 0.1 * val  # uniform std
    vpt.train()
    assert vpt.prompt_dropout.training and not base.training
    zeros = VPT(_timm_vit(), NAMES, VPTConfig(num_tokens=2, init="zeros"))
    assert torch.count_nonzero(zeros.prompt_embeddings) == 0


def test_heads_and_errors(tiny, images):
    linear = VPT(tiny, NAMES, VPTConfig(num_tokens=2))
    assert linear.head.in_features == 32 and linear.head.out_features == 5  # CLIP: projected embedding
    out = linear(images)
    assert out.logits.shape == (2, 5) and out.features.shape == (2, 32) and out.cosine is None
    with pytest.raises(ConfigError, match="zeroshot_text.*CLIP"):
        VPT(_timm_vit(), NAMES, VPTConfig(head="zeroshot_text"))
    with pytest.raises(ConfigError, match="head.*'mlp'.*linear, zeroshot_text"):
        create_adapter("vpt", tiny, NAMES, {"head": "mlp"})
    with pytest.raises(ConfigError, match="num_tokens"):
        create_adapter("vpt", tiny, NAMES, {"num_tokens": -1})
    with pytest.raises(ModelError, match="VPT needs"):
        VPT(torch.nn.Linear(3, 3), NAMES)


# ----------------------------------------------------------------------------- timm loader
def test_load_timm_vit_random_and_from_file(tmp_path, images):
    torch.manual_seed(0)
    src = load_timm_vit("vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert src.num_classes == 0 and src.patch_embed.img_size == (32, 32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    torch.manual_seed(1)
    loaded = load_timm_vit("vit_tiny_patch16_224", pretrained=str(path), img_size=32)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), src.eval()(images), rtol=0, atol=0)


def test_load_timm_vit_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="not found"):
        load_timm_vit("vit_tiny_patch16_224", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelError, match="unknown timm model 'vit_tiny_patch16_2240'.*similar"):
        load_timm_vit("vit_tiny_patch16_2240")
    bad = tmp_path / "bad.safetensors"
    save_file({"nonsense": torch.zeros(2)}, str(bad))
    with pytest.raises(ModelError, match="bad.safetensors"):
        load_timm_vit("vit_tiny_patch16_224", pretrained=str(bad), img_size=32)
    # offline and nothing cached: a clear error right away, no hub retries
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.setattr(vit_mod, "_cached_weights", lambda name: None)
    with pytest.raises(ModelError, match="unreachable.*pretrained='/path/to/model.safetensors'"):
        load_timm_vit("vit_tiny_patch16_224", pretrained=True)
    # in the fewshot job the advice names the key that works there (a local file, no hub)
    with pytest.raises(ModelError, match=r"unreachable.*backbone\.checkpoint=/path/to/model\.safetensors") as info:
        load_timm_vit("vit_tiny_patch16_224", pretrained=True, config_section="backbone")
    assert "model.pretrained" not in str(info.value)
