"""LoRA through peft: exact split projections, untrained = backbone, trainable set, scaling by hand,
merge equality, checkpoint contents, attention relevance, and fewshot runs (tiny random models)."""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from backmix_vlm.adapters import LoRA, LoRAConfig, create_adapter, lora_default_schedule
from backmix_vlm.errors import ConfigError, ModelError
from backmix_vlm.models.clip import TINY_CLIP, build_text_features, encode_image_global_local, load_clip
from backmix_vlm.models.split_attention import SplitAttention, SplitQKV
from backmix_vlm.saliency.attention import AttentionRelevance, clip_logits_fn

pytest.importorskip("peft")
NAMES = ["cat", "dog", "car", "ship", "frog"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip(TINY_CLIP, pretrained=None)


def _timm_vit(num_classes: int = 5) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                             num_classes=num_classes).eval()


@pytest.fixture()
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _randomize_lora(adapter: LoRA, seed: int = 0, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter.lora_parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- split projections
@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_equals_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    split = SplitAttention(mha).eval()
    x = torch.randn(3, 7, 16) if batch_first else torch.randn(7, 3, 16)
    causal = torch.full((7, 7), float("-inf")).triu(1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": causal}, {"attn_mask": causal.isinf()}, {"key_padding_mask": pad}):
            ref, _ = mha(x, x, x, need_weights=False, **kwargs)
            got, _ = split(x, x, x, need_weights=False, **kwargs)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        ref, ref_w = mha(x, x, x, need_weights=True, attn_mask=causal)
        got, got_w = split(x, x, x, need_weights=True, attn_mask=causal)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_w, ref_w, rtol=0, atol=1e-6)
    # the projections are views of the original tensors, not copies
    assert split.q_proj.weight.data_ptr() == mha.in_proj_weight.data_ptr()
    assert torch.equal(split.in_proj_weight, mha.in_proj_weight)
    back = split.to_multihead_attention()
    assert torch.equal(back.in_proj_weight, mha.in_proj_weight) and torch.equal(back.out_proj.bias, mha.out_proj.bias)


def test_split_qkv_equals_fused_linear():
    torch.manual_seed(0)
    qkv = nn.Linear(8, 24)
    split = SplitQKV(qkv)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(split(x), qkv(x), rtol=0, atol=1e-6)
    assert torch.equal(split.to_linear().weight, qkv.weight) and split.out_features == 24


# ----------------------------------------------------------------------------- untrained = backbone
def test_untrained_lora_reproduces_clip(tiny, images):
    lora = create_adapter("lora", tiny, NAMES)
    with torch.no_grad():
        out = lora(images)
        ref = tiny.model.encode_image(images)
        text = build_text_features(tiny, NAMES)
        ref_g, ref_l = encode_image_global_local(tiny.model, images)
    torch.testing.assert_close(out.features, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(lora.encode_text(), text, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.cosine, F.normalize(ref, dim=-1) @ text.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits, tiny.model.logit_scale.exp() * out.cosine)
    torch.testing.assert_close(out.local_cosine, F.normalize(ref_l, dim=-1) @ text.T, rtol=0, atol=1e-6)


def test_untrained_lora_reproduces_timm(images):
    base = _timm_vit()
    lora = LoRA(base, NAMES)  # head: auto -> linear
    with torch.no_grad():
        lora.head.load_state_dict(base.head.state_dict())
        torch.testing.assert_close(lora(images).logits, base(images), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- trainable set
def test_trainable_set_is_exactly_the_lora_matrices(tiny):
    lora = create_adapter("lora", tiny, NAMES)  # CLIP-LoRA: q, k, v of every block of both towers
    names = lora.trainable_parameter_names()
    expected = {f"base.{tower}.{i}.attn.{t}_proj.lora_{ab}.default.weight"
                for tower in ("visual.transformer.resblocks", "transformer.resblocks")
                for i in range(2) for t in "qkv" for ab in "AB"}
    assert set(names) == expected
    assert lora.num_trainable() == 12 * 2 * (64 + 64)  # 12 projections x rank 2 x (in + out)
    assert set(lora.state_dict_trainable()) == expected
    frozen = [n for n, p in lora.named_parameters() if not p.requires_grad]
    assert frozen and all(".lora_" not in n for n in frozen)

    custom = create_adapter("lora", tiny, NAMES, {"targets": ["v", "o", "mlp_in"], "towers": ["vision"],
                                                   "blocks": [-1], "rank": 4})
    assert set(custom.trainable_parameter_names()) == {
        f"base.visual.transformer.resblocks.1.{m}.lora_{ab}.default.weight"
        for m in ("attn.v_proj", "attn.out_proj", "mlp.c_fc") for ab in "AB"}
    assert isinstance(custom.base.visual.transformer.resblocks[0].attn, nn.MultiheadAttention)  # block 0 untouched
    assert isinstance(custom.base.transformer.resblocks[1].attn, nn.MultiheadAttention)  # text tower untouched


def test_timm_trainable_set_is_lora_plus_head():
    lora = LoRA(_timm_vit(), NAMES, {"targets": ["q", "v", "o"]})
    names = set(lora.trainable_parameter_names())
    assert names == {f"base.blocks.{i}.attn.{m}.lora_{ab}.default.weight"
                     for i in range(3) for m in ("qkv.q", "qkv.v", "proj") for ab in "AB"} | {"head.weight", "head.bias"}


def test_a_training_step_moves_only_lora_and_leaves_the_backbone_alone(tiny, images):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    lora = create_adapter("lora", tiny, NAMES)
    base_before = {n: p.clone() for n, p in lora.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(lora.trainable_parameters(), lr=1e-2)
    lora.train()
    assert not lora.base.training and lora._lora_layers[0].training  # LoRA dropout on, frozen base in eval
    for _ in range(2):
        loss = F.cross_entropy(lora(images).logits, torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in lora.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in lora.lora_parameters() if "lora_B" in n)
    assert all(torch.equal(v, before[k]) for k, v in tiny.model.state_dict().items())  # caller's model untouched
    assert isinstance(tiny.model.visual.transformer.resblocks[0].attn, nn.MultiheadAttention)


# ----------------------------------------------------------------------------- the update, by hand
@pytest.mark.parametrize("rslora,scale", [(True, 1 / math.sqrt(2)), (False, 0.5)])
def test_lora_update_matches_a_hand_computation(tiny, rslora, scale):
    lora = create_adapter("lora", tiny, NAMES, {"rslora": rslora})
    assert LoRAConfig(rslora=rslora).scaling == pytest.approx(scale)
    _randomize_lora(lora)
    lora.eval()
    q = lora.base.visual.transformer.resblocks[0].attn.q_proj
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    w, bias = tiny.model.visual.transformer.resblocks[0].attn.in_proj_weight[:64], \
        tiny.model.visual.transformer.resblocks[0].attn.in_proj_bias[:64]
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ w.T + bias + scale * (x @ a.T) @ b.T, rtol=0, atol=1e-5)


def test_dropout_acts_on_the_lora_branch_in_training_only(tiny, images):
    lora = create_adapter("lora", tiny, NAMES, {"dropout": 0.5})
    _randomize_lora(lora)
    with torch.no_grad():
        lora.train()
        a, b = lora(images).logits, lora(images).logits
        lora.eval()
        c, d = lora(images).logits, lora(images).logits
    assert not torch.allclose(a, b) and torch.equal(c, d)


# ----------------------------------------------------------------------------- merge
def test_merged_clip_is_a_plain_open_clip_state_dict_with_the_same_forward(tiny, images):
    lora = create_adapter("lora", tiny, NAMES, {"targets": ["q", "k", "v", "o", "mlp_in", "mlp_out"]})
    _randomize_lora(lora)
    lora.eval()
    sd = lora.merged_state_dict()
    fresh = open_clip.create_model(TINY_CLIP)
    assert set(sd) == set(fresh.state_dict())
    fresh.load_state_dict(sd, strict=True)
    fresh.eval()
    with torch.no_grad():
        out = lora(images)
        feats = fresh.encode_image(images)
        text = F.normalize(fresh.encode_text(lora.tokens), dim=-1)
        assert not torch.allclose(out.features, tiny.model.encode_image(images), atol=1e-3)  # LoRA changed it
        torch.testing.assert_close(feats, out.features, rtol=0, atol=1e-5)
        torch.testing.assert_close(text, lora.encode_text(), rtol=0, atol=1e-5)
        logits = fresh.logit_scale.exp() * F.normalize(feats, dim=-1) @ text.T
        torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)
        _, local = encode_image_global_local(fresh, images)  # LoCoOp value path reads LoRA'd v/out too
        torch.testing.assert_close(F.normalize(local, dim=-1) @ text.T, out.local_cosine, rtol=0, atol=1e-5)


def test_merged_timm_loads_into_a_timm_classifier(images):
    lora = LoRA(_timm_vit(num_classes=0), NAMES, {"targets": ["q", "k", "v", "o", "mlp_out"]})
    _randomize_lora(lora)
    with torch.no_grad():
        lora.head.weight.normal_()
    lora.eval()
    fresh = _timm_vit(num_classes=len(NAMES))
    fresh.load_state_dict(lora.merged_state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), lora(images).logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints
def test_adapter_files_hold_only_lora_tensors_and_the_config(tiny, images, tmp_path):
    from safetensors.torch import load_file

    lora = create_adapter("lora", tiny, NAMES, {"rank": 3})
    _randomize_lora(lora)
    folder = lora.save_adapter(tmp_path / "adapter")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert set(tensors) == set(lora.trainable_parameter_names())
    other = create_adapter("lora", tiny, NAMES, {"rank": 3})
    other.load_adapter(folder)
    lora.eval()
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(images).logits, lora(images).logits)
    with pytest.raises(ModelError, match="differs"):
        create_adapter("lora", tiny, NAMES, {"rank": 2}).load_adapter(folder)


# ----------------------------------------------------------------------------- attention relevance
def test_relevance_over_lora_blocks_equals_the_merged_model(tiny, images):
    lora = create_adapter("lora", tiny, NAMES, {"targets": ["q", "k", "v", "o"], "towers": ["vision"]})
    _randomize_lora(lora)
    lora.eval()
    labels = torch.tensor([1, 3])
    rel = AttentionRelevance(list(lora.blocks), start_layer=0, num_prefix_tokens=1, grid=(4, 4))
    maps = rel(images, labels, lambda x: lora(x).logits)
    merged = lora.merge()
    ref = AttentionRelevance(merged, start_layer=0, num_prefix_tokens=1, grid=(4, 4))(
        images, labels, clip_logits_fn(merged, lora.encode_text()))
    torch.testing.assert_close(maps, ref, rtol=0, atol=1e-5)
    assert maps.shape == (2, 4, 4)


# ----------------------------------------------------------------------------- config
def test_bad_options_are_named(tiny):
    with pytest.raises(ConfigError, match="adapter.targets"):
        create_adapter("lora", tiny, NAMES, {"targets": ["query"]})
    with pytest.raises(ConfigError, match="adapter.blocks: 5"):
        create_adapter("lora", tiny, NAMES, {"blocks": [5]})
    with pytest.raises(ConfigError, match="no text tower"):
        LoRA(_timm_vit(), NAMES, {"towers": ["vision", "text"]})
    with pytest.raises(ConfigError, match="zeroshot_text"):
        LoRA(_timm_vit(), NAMES, {"towers": ["vision"], "head": "zeroshot_text"})
    with pytest.raises(ConfigError, match="unknown"):
        create_adapter("lora", tiny, NAMES, {"ranks": 2})


def test_default_schedule_is_clip_lora():
    s = lora_default_schedule(16, 10)  # 160 images, batch 32 -> 5 steps / epoch; 8000 iterations
    assert (s["name"], s["lr"], s["weight_decay"], s["batch_size"], s["schedule"]) == ("adamw", 2e-4, 1e-2, 32, "cosine")
    assert s["epochs"] == 1600 and s["warmup_epochs"] == 0
    assert lora_default_schedule(1, 10)["epochs"] == 500  # 10 images: one batch per epoch
    assert lora_default_schedule(16, 1000)["epochs"] == 16  # ImageNet 16-shot: 500 steps / epoch
    assert lora_default_schedule(None, None)["epochs"] == 10


# ----------------------------------------------------------------------------- fewshot runs
def _fewshot(tmp_path, *extra):
    from pathlib import Path

    from backmix_vlm.runners.fewshot import load_fewshot_config

    config = Path(__file__).resolve().parents[1] / "configs" / "fewshot" / "tiny_demo.yaml"
    fast = ["data.shots=2", "optim.epochs=2", "optim.batch_size=10", "optim.warmup_epochs=0",
            "eval.ood=[{name: demo, split: ood-cifar100, label: c100, max_samples: 30}]",
            "data.test.max_samples=30", "eval.batch_size=30", "data.seeds=[1]"]
    return load_fewshot_config(config, [f"run.output_dir={tmp_path}", *fast, "method.name=lora", "method.options={}", *extra])


def test_fewshot_lora_clip_backmix_maps_from_the_training_backward(tmp_path):
    from backmix_vlm.augment.mask_bank import INIT_VALUE
    from backmix_vlm.engine.checkpoint import load_checkpoint
    from backmix_vlm.runners.fewshot import run_fewshot

    agg = run_fewshot(_fewshot(tmp_path, "method.options={rank: 2}"), tmp_path / "run")
    assert agg["method"] == "LoRA + BackMix" and {"mcm", "glmcm"} <= set(agg["results"]["c100"])
    state = load_checkpoint(tmp_path / "run" / "seed1" / "last.pt")
    assert state["trainable_only"] and state["model"] and all(".lora_" in k for k in state["model"])
    assert len(state["model"]) == 24  # 2 towers x 2 blocks x q/k/v x (A, B)
    assert state["meta"]["adapter"] == {"method": "lora", "config": {**LoRAConfig().__dict__, "rank": 2}}
    bank = state["bank"]["bank"]
    assert bank.shape == (20, 4, 4) and bool((bank != INIT_VALUE).flatten(1).any(1).all())

    # scripts/merge_lora.py: the run's LoRA folded into a plain open_clip state dict
    import runpy
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from backmix_vlm.runners.fewshot import adapter_config, build_backbone
    from backmix_vlm.jobs.runs import record_run

    cfg = _fewshot(tmp_path, "method.options={rank: 2}")
    record_run(tmp_path / "run", cfg, "fewshot", None)  # what `backmix-vlm fewshot` writes beside the seeds
    script = Path(__file__).resolve().parents[1] / "scripts" / "merge_lora.py"
    argv = sys.argv
    sys.argv = [str(script), str(tmp_path / "run"), "--out", str(tmp_path / "merged.safetensors"),
                "--adapter-dir", str(tmp_path / "adapter")]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        assert e.code == 0
    finally:
        sys.argv = argv
    merged = open_clip.create_model(TINY_CLIP)
    merged.load_state_dict(load_file(str(tmp_path / "merged.safetensors")), strict=True)
    adapter = create_adapter("lora", build_backbone(cfg, "cpu").base, state["meta"]["classes"], adapter_config(cfg))
    adapter.load_adapter(tmp_path / "adapter")
    adapter.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval().encode_image(x), adapter(x).features, rtol=0, atol=1e-5)


def test_fewshot_lora_timm_and_text_only(tmp_path):
    from backmix_vlm.augment.mask_bank import INIT_VALUE
    from backmix_vlm.engine.checkpoint import load_checkpoint
    from backmix_vlm.runners.fewshot import run_fewshot

    timm = ["backbone.family=timm", "backbone.name=vit_tiny_patch16_224", "backbone.pretrained=null",
            "backbone.image_size=32", "backbone.options={patch_size: 8, depth: 2}", "eval.scores=[msp,energy]"]
    run_fewshot(_fewshot(tmp_path, *timm), tmp_path / "timm")
    state = load_checkpoint(tmp_path / "timm" / "seed1" / "last.pt")
    assert set(state["model"]) >= {"head.weight", "head.bias"} and len(state["model"]) == 2 * 3 * 2 + 2
    assert bool((state["bank"]["bank"] != INIT_VALUE).flatten(1).any(1).all())
    # text tower only: no gradient reaches the image tower, so CoOp's reuse-forward tail pass makes the maps
    run_fewshot(_fewshot(tmp_path, "method.options={towers: [text]}"), tmp_path / "text")
    state = load_checkpoint(tmp_path / "text" / "seed1" / "last.pt")
    assert all(k.startswith("base.transformer.") for k in state["model"])
    assert bool((state["bank"]["bank"] != INIT_VALUE).flatten(1).any(1).all())


def test_fewshot_lora_defaults_to_the_clip_lora_schedule():
    from pathlib import Path

    from backmix_vlm.runners.fewshot import load_fewshot_config

    base = Path(__file__).resolve().parents[1] / "configs" / "fewshot" / "table_v" / "16shot_coop.yaml"
    cfg = load_fewshot_config(base, ["method.name=lora"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size) == ("adamw", 2e-4, 1600, 32)
    cfg = load_fewshot_config(base, ["method.name=lora", "optim.epochs=7", "optim.lr=1e-3"])
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.optim.weight_decay) == (7, 1e-3, 1e-2)
    assert load_fewshot_config(base, ["method.name=coop"]).optim.name == "sgd"


def test_block_layout_switches_reach_split_attention(tiny, images):
    from backmix_vlm.models.clip import set_block_layout

    lora = create_adapter("lora", tiny, NAMES)
    _randomize_lora(lora)
    lora.eval()
    with torch.no_grad():
        ref = lora(images).logits
        for layout in ("batch_first", "seq_first"):
            set_block_layout(lora.base, layout)
            lora._text_cache = None  # recompute the text side in this layout too
            assert lora.base.visual.transformer.resblocks[0].attn.batch_first == (layout == "batch_first")
            torch.testing.assert_close(lora(images).logits, ref, rtol=0, atol=1e-5)
