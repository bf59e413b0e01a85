"""Gradient-weighted attention relevance: exact parity with step-by-step references."""
from __future__ import annotations

import math

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from backmix_vlm.errors import ConfigError, ModelError
from backmix_vlm.models.clip import TINY_CLIP
from backmix_vlm.saliency.attention import (
    AttentionRelevance,
    clip_logits_fn,
    explicit_attention,
    minmax_normalize,
    relevance_from_attentions,
    resolve_blocks,
)


def identity_record(_i: int, a: torch.Tensor) -> torch.Tensor:
    return a


def tiny_timm(**kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             num_classes=5, depth=3, **kw).eval()


def tiny_clip(**vision) -> nn.Module:
    torch.manual_seed(0)
    if not vision:
        return open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    cfg = {**dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16), **vision}
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=32, vision_cfg=cfg, text_cfg=text).eval()


def no_instance_forwards(model: nn.Module) -> bool:
    return all("forward" not in m.__dict__ for m in model.modules())


# ----------------------------------------------------------------------------- toy transformer
class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]  # fused path: no weights exposed
        return x + self.mlp(self.ln2(x))


class ToyViT(nn.Module):
    """2 blocks, 2 heads, 12x12 images in 4x4 patches (3x3 grid) + CLS, 3 classes."""

    def __init__(self, dim: int = 16, heads: int = 2, layers: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Linear(3 * 16, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 10, dim) * 0.5)
        self.blocks = nn.ModuleList(ToyBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(images, 4, stride=4).transpose(1, 2)  # (B, 9, 48), row-major grid
        x = self.patch(patches)
        return torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def reference_maps(model: ToyViT, images: torch.Tensor, targets: torch.Tensor, start: int) -> torch.Tensor:
    """One image at a time, one head at a time, explicit softmax, plain relevance loops."""
    dim, heads = model.head.in_features, model.blocks[0].attn.num_heads
    hd = dim // heads
    maps = []
    for b in range(len(images)):
        x = model.embed(images[b:b + 1])[0].detach().requires_grad_(True)
        attns = []
        for blk in model.blocks:
            h = blk.ln1(x)
            w, bias = blk.attn.in_proj_weight, blk.attn.in_proj_bias
            q, k, v = (h @ w[i * dim:(i + 1) * dim].T + bias[i * dim:(i + 1) * dim] for i in range(3))
            outs, layer = [], []
            for j in range(heads):
                sl = slice(j * hd, (j + 1) * hd)
                a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd), dim=-1)
                layer.append(a)
                outs.append(a @ v[:, sl])
            x = x + blk.attn.out_proj(torch.cat(outs, -1))
            x = x + blk.mlp(blk.ln2(x))
            attns.append(layer)
        logits = model.head(model.norm(x)[0])
        assert torch.allclose(logits, model(images[b:b + 1])[0], atol=1e-5)  # same network
        flat = [a for layer in attns for a in layer]
        grads = torch.autograd.grad(logits[targets[b]], flat)
        tokens = x.shape[0]
        rel = torch.eye(tokens)
        for layer in range(start % len(attns), len(attns)):
            cam = torch.zeros(tokens, tokens)
            for j in range(heads):
                cam += (grads[layer * heads + j] * attns[layer][j]).clamp(min=0)
            rel = rel + (cam / heads) @ rel
        row = rel[0, 1:]
        maps.append(((row - row.min()) / (row.max() - row.min())).view(3, 3))
    return torch.stack(maps)


@pytest.mark.parametrize("start", [0, 1, -1])
def test_toy_transformer_matches_step_by_step_reference(start: int) -> None:
    torch.manual_seed(1)
    model = ToyViT().eval()
    images, targets = torch.randn(3, 3, 12, 12), torch.tensor([0, 2, 1])
    maps = AttentionRelevance(model, start_layer=start)(images, targets, model)
    assert maps.shape == (3, 3, 3)
    torch.testing.assert_close(maps, reference_maps(model, images, targets, start), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- the pure rule
def test_relevance_rule_hand_computed() -> None:
    a = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    g = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    # head 2 has the opposite gradient: clamping happens per head, before the head mean
    attn = torch.stack([a, a])[None]
    grad = torch.stack([g, -g])[None]
    cam = torch.tensor([[0.5, 0.5], [0.4, 0.0]]) / 2  # (clamp(g*a) + clamp(-g*a)) / 2
    last = relevance_from_attentions([attn, attn], [None, grad], start_layer=-1)
    torch.testing.assert_close(last[0], torch.eye(2) + cam)
    both = relevance_from_attentions([attn, attn], [grad, grad], start_layer=0)
    r1 = torch.eye(2) + cam
    torch.testing.assert_close(both[0], r1 + cam @ r1)
    with pytest.raises(ConfigError, match="start_layer=2"):
        relevance_from_attentions([attn, attn], [grad, grad], start_layer=2)


def test_minmax_normalize_per_image_and_constant_maps() -> None:
    maps = torch.tensor([[[1.0, 3.0], [2.0, 1.0]], [[4.0, 4.0], [4.0, 4.0]]])
    out = minmax_normalize(maps)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))  # no ranking -> zeros (documented)


# ----------------------------------------------------------------------------- explicit = fused
@pytest.mark.parametrize("vision", [{}, {"qk_norm": True}, {"scale_heads": True, "scale_attn_inner": True}])
def test_open_clip_explicit_attention_equals_fused(vision: dict) -> None:
    model = tiny_clip(**vision)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model.encode_image(images)
        seen = []
        with explicit_attention(resolve_blocks(model), lambda i, a: seen.append(i) or a):
            explicit = model.encode_image(images)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    assert seen == [0, 1] and no_instance_forwards(model)


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"reg_tokens": 2, "init_values": 0.1}])
def test_timm_explicit_attention_equals_fused(kw: dict) -> None:
    model = tiny_timm(**kw)
    assert all(b.attn.fused_attn for b in model.blocks)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(images)
        with explicit_attention(resolve_blocks(model), identity_record):
            explicit = model(images)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    assert no_instance_forwards(model)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_explicit_matches_torch_incl_masks(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[:, 4] = True
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3] = True
    ref_out, ref_w = mha(x, x, x, attn_mask=mask, key_padding_mask=pad, average_attn_weights=False)
    with explicit_attention([nn.ModuleDict({"attn": mha})], identity_record):
        out, w = mha(x, x, x, attn_mask=mask, key_padding_mask=pad, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)


def test_timm_explicit_attention_matches_timm_unfused_branch() -> None:
    """Independent reference: timm's own non-fused code (A captured at its attn_drop)."""
    model = tiny_timm()
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    captured = []
    hooks = [b.attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o)) for b in model.blocks]
    try:
        for b in model.blocks:
            b.attn.fused_attn = False
        logits = model(images)
    finally:
        for b in model.blocks:
            b.attn.fused_attn = True
        for h in hooks:
            h.remove()
    grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), captured)
    rel = relevance_from_attentions(captured, list(grads), 0)
    expected = minmax_normalize(rel[:, 0, 1:].reshape(2, 4, 4))
    maps = AttentionRelevance(model, start_layer=0)(images, targets, model)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- extractor behaviour
def test_frozen_weights_untouched_and_forwards_restored() -> None:
    model = tiny_timm()
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)  # a mix of frozen and trainable parameters
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    AttentionRelevance(model, start_layer=0)(images, targets, model)
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert no_instance_forwards(model)

    def broken(x: torch.Tensor) -> torch.Tensor:
        model(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        AttentionRelevance(model)(images, targets, broken)
    assert no_instance_forwards(model)
    torch.testing.assert_close(model(images), model(images))  # fused path works again


def test_start_layers_differ_in_range_and_last_layer_backward_is_shallow() -> None:
    model = tiny_clip()  # backmix-tiny-clip: 2 vision blocks, 4x4 grid
    text = torch.randn(6, 32)
    images, targets = torch.randn(3, 3, 32, 32), torch.tensor([0, 5, 2])
    first_block_grad = []
    hook = model.visual.transformer.resblocks[0].register_forward_hook(
        lambda m, i, o: first_block_grad.append(o.requires_grad))
    try:
        last = AttentionRelevance(model, start_layer=-1)(images, targets, clip_logits_fn(model, text))
        every = AttentionRelevance(model, start_layer=0)(images, targets, clip_logits_fn(model, text))
    finally:
        hook.remove()
    assert first_block_grad == [False, True]  # start -1: block 0 runs without a graph; start 0: with
    for maps in (last, every):
        assert maps.shape == (3, 4, 4) and maps.dtype == torch.float32
        assert maps.min() >= 0 and maps.max() <= 1
        assert torch.allclose(maps.amax(dim=(1, 2)), torch.ones(3))
    assert not torch.allclose(last, every, atol=1e-3)


def test_b16_geometry_at_224px_gives_a_14x14_grid() -> None:
    model = tiny_clip(image_size=224, patch_size=16, width=32, layers=1)  # ViT-B/16's token layout, narrow
    maps = AttentionRelevance(model)(torch.randn(1, 3, 224, 224), torch.tensor([1]),
                                     clip_logits_fn(model, torch.randn(2, 32)))
    assert maps.shape == (1, 14, 14) and 0 <= maps.min() and maps.max() == 1


def test_batched_maps_equal_one_image_at_a_time() -> None:
    model = tiny_timm()
    images, targets = torch.randn(3, 3, 32, 32), torch.tensor([2, 0, 4])
    ext = AttentionRelevance(model, start_layer=0)
    batched = ext(images, targets, model)
    single = torch.cat([ext(images[i:i + 1], targets[i:i + 1], model) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_gives_float_maps() -> None:
    model = tiny_timm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = AttentionRelevance(model)(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), model)
    assert maps.dtype == torch.float32 and maps.shape == (2, 4, 4) and maps.max() == 1


# ----------------------------------------------------------------------------- prefix tokens (VPT)
class PromptedViT(nn.Module):
    """VPT-shallow stand-in: frozen timm ViT, trainable prompt tokens inserted after CLS."""

    def __init__(self, vit: nn.Module, num_prompts: int) -> None:
        super().__init__()
        self.vit = vit.requires_grad_(False)
        self.prompts = nn.Parameter(torch.randn(1, num_prompts, vit.embed_dim) * 0.5)
        self.num_prefix_tokens = 1 + num_prompts

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v._pos_embed(v.patch_embed(images))
        x = torch.cat([x[:, :1], self.prompts.expand(len(x), -1, -1), x[:, 1:]], 1)
        x = v.norm(v.blocks(v.norm_pre(x)))
        return v.head(x[:, 0])


def test_prefix_tokens_are_skipped() -> None:
    model = PromptedViT(tiny_timm(), num_prompts=3)
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    ext = AttentionRelevance(model, start_layer=0)
    assert ext.layout(1 + 3 + 16) == (4, (4, 4))  # from the wrapper, not the inner ViT's 1
    captured = []

    def record(i: int, a: torch.Tensor) -> torch.Tensor:
        captured.append(a)
        return a

    with explicit_attention(resolve_blocks(model), record):
        logits = model(images)
    grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), captured)
    rel = relevance_from_attentions(captured, list(grads), 0)
    expected = minmax_normalize(rel[:, 0, 4:].reshape(2, 4, 4))
    torch.testing.assert_close(ext(images, targets, model), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ModelError, match="19 patches"):  # told 1 prefix token: 19 "patches"
        AttentionRelevance(resolve_blocks(model), num_prefix_tokens=1)(images, targets, model)
    # timm register tokens come from the model's own num_prefix_tokens
    reg = tiny_timm(reg_tokens=2)
    assert AttentionRelevance(reg).layout(3 + 16) == (3, (4, 4))
    assert AttentionRelevance(reg)(images, targets, reg).shape == (2, 4, 4)


# ----------------------------------------------------------------------------- recording mode
def test_recording_mode_equals_separate_pass() -> None:
    model = PromptedViT(tiny_timm(), num_prompts=2)
    images, targets = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    ext = AttentionRelevance(model, start_layer=0)
    separate = ext(images, targets, model)
    assert model.prompts.grad is None  # the separate pass leaves no .grad behind

    # backward of a loss whose gradient is minus the target logits' gradient
    with ext.record() as rec:
        logits = model(images)
    (-logits.gather(1, targets[:, None]).sum()).backward()
    torch.testing.assert_close(rec.maps(), separate, atol=1e-5, rtol=1e-4)
    assert model.prompts.grad is not None  # the training backward still trains the prompts

    # exact variant: target-logit gradients first, then the real CE training backward
    model.prompts.grad = None
    with ext.record() as rec:
        logits = model(images)
        rec.target_grads(logits, targets)
    F.cross_entropy(logits, targets).backward()
    torch.testing.assert_close(rec.maps(), separate, atol=1e-5, rtol=1e-4)

    # a score to maximise: from_loss=False keeps the sign
    with ext.record() as rec:
        logits = model(images)
    logits.gather(1, targets[:, None]).sum().backward()
    torch.testing.assert_close(rec.maps(from_loss=False), separate, atol=1e-5, rtol=1e-4)
    assert no_instance_forwards(model)


def test_recording_a_frozen_tower_says_use_the_separate_pass() -> None:
    model = tiny_clip().requires_grad_(False)
    ext = AttentionRelevance(model)
    with ext.record() as rec:
        model.encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(ModelError, match="separate pass"):
        rec.maps()


# ----------------------------------------------------------------------------- model layout
def test_resolve_blocks_picks_the_image_tower() -> None:
    model = tiny_clip()
    assert resolve_blocks(model)[0] is model.visual.transformer.resblocks[0]

    class Wrapper(nn.Module):  # e.g. an adapter holding the CLIP as `.base`
        def __init__(self) -> None:
            super().__init__()
            self.base = model

    assert resolve_blocks(Wrapper())[1] is model.visual.transformer.resblocks[1]
    with pytest.raises(ModelError, match="not supported"):
        AttentionRelevance([nn.ModuleDict({"attn": nn.Linear(2, 2)})])
    with pytest.raises(ConfigError, match="start_layer=5"):
        AttentionRelevance(model, start_layer=5)


@pytest.mark.parametrize("base", ["timm", "clip"])
def test_vpt_adapter_recording_equals_separate_pass(base: str) -> None:
    from backmix_vlm.adapters.vpt import VPT

    torch.manual_seed(0)
    backbone = tiny_timm() if base == "timm" else tiny_clip()
    vpt = VPT(backbone, ["a", "b", "c"], {"num_tokens": 3, "deep": True}).eval()
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([2, 0])
    ext = AttentionRelevance(vpt, start_layer=0)
    assert ext.layout(vpt.num_prefix_tokens + 16) == (vpt.num_prefix_tokens, (4, 4))
    separate = ext(images, targets, vpt)  # a ModelOutput-returning model is a valid logits_fn
    assert separate.shape == (2, 4, 4)
    with ext.record() as rec:
        out = vpt(images)
        rec.target_grads(out, targets)
    F.cross_entropy(out.logits, targets).backward()
    torch.testing.assert_close(rec.maps(), separate, atol=1e-5, rtol=1e-4)
    assert vpt.prompt_embeddings.grad is not None
    assert all(p.grad is None for p in vpt.base.parameters())


# ----------------------------------------------------------------------------- fused outside the window
def _explicit_blocks(blocks) -> list[int]:
    return [i for i, b in enumerate(blocks) if "forward" in b.attn.__dict__]


@pytest.mark.parametrize("start_layer", [-1, 0, 1])
def test_only_blocks_the_relevance_reads_run_explicit_attention(start_layer: int) -> None:
    """Blocks before start_layer keep their fused attention in both modes; maps are unchanged."""
    model = PromptedViT(tiny_timm(), num_prompts=2)  # 3 blocks
    blocks = resolve_blocks(model)
    images, targets = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    ext = AttentionRelevance(model, start_layer=start_layer)
    patched: list[list[int]] = []
    explicit_everywhere: list[torch.Tensor] = []

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        patched.append(_explicit_blocks(blocks))
        return model(x)

    maps = ext(images, targets, logits_fn)
    assert patched == [list(range(ext.start, 3))]
    with ext.record() as rec:
        assert _explicit_blocks(blocks) == list(range(ext.start, 3))
        logits = model(images)
    (-logits.gather(1, targets[:, None]).sum()).backward()
    assert all(a is None for a in rec.attns[:ext.start])  # nothing kept below the window
    assert all(a is not None and a.grad is not None for a in rec.attns[ext.start:])
    torch.testing.assert_close(rec.maps(), maps, atol=1e-5, rtol=1e-4)
    # reference: every block explicit (the previous behaviour) gives the same maps
    attns: list = [None] * 3

    def record_all(i: int, a: torch.Tensor) -> torch.Tensor:
        if i >= ext.start:
            a = a.detach().requires_grad_(True) if i == ext.start else a
            attns[i] = a
        return a

    with torch.enable_grad(), explicit_attention(blocks, record_all, no_grad_below=ext.start):
        selected = model(images).gather(1, targets[:, None]).sum()
    grads = torch.autograd.grad(selected, attns[ext.start:])
    rel = relevance_from_attentions(attns, [None] * ext.start + list(grads), ext.start)
    explicit_everywhere.append(ext.to_maps(rel))
    torch.testing.assert_close(maps, explicit_everywhere[0], atol=1e-5, rtol=1e-4)
    assert no_instance_forwards(model)


def test_explicit_attention_on_a_bf16_held_clip_matches_fused() -> None:
    """Low precision: attention logits and softmax in fp32, so the explicit and fused blocks agree."""
    from backmix_vlm.models.frozen import hold_frozen_in

    model = tiny_clip()
    hold_frozen_in(model, torch.bfloat16)
    images = torch.randn(4, 3, 32, 32)
    for layout in ("batch_first", "seq_first"):
        from backmix_vlm.models.clip import set_block_layout

        set_block_layout(model, layout)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fused = model.encode_image(images).float()
            seen = []
            with explicit_attention(resolve_blocks(model), lambda i, a: seen.append(a.dtype) or a):
                explicit = model.encode_image(images).float()
        assert seen == [torch.float32, torch.float32]
        assert float(F.cosine_similarity(fused, explicit).min()) > 0.9999
    maps = AttentionRelevance(model)(images, torch.tensor([0, 1, 2, 3]), clip_logits_fn(model, torch.randn(5, 32)))
    assert maps.dtype == torch.float32 and maps.shape == (4, 4, 4)
