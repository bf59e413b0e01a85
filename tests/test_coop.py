"""CoOp: exact parity with open_clip's encode_text, token layouts, CSC, schedule, config errors."""
from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from backmix_vlm.adapters import CoOp, CoOpConfig, coop_default_schedule, create_adapter
from backmix_vlm.config import OptimConfig
from backmix_vlm.errors import ConfigError, RegistryError
from backmix_vlm.models.clip import TINY_CLIP, encode_image_global_local, load_clip

# multi-token names and an underscore name (CoOp replaces "_" by " ")
NAMES = ["airplane", "maple_tree", "sweet pepper", "cat"]
CLEAN = [n.replace("_", " ") for n in NAMES]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip(TINY_CLIP, pretrained=None)


@pytest.fixture(scope="module")
def vitb16():
    """A randomly initialised ViT-B/16 CLIP (~150M params): built once for this module."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    return model, open_clip.get_tokenizer("ViT-B-16")


def _reference(model, tokenizer, texts):
    with torch.no_grad():
        return model.encode_text(tokenizer(texts))


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("which", ["tiny", "custom_text"])
def test_ctx_init_text_features_equal_encode_text_tiny(tiny, which):
    if which == "tiny":
        model, tok = tiny.model, tiny.tokenizer
    else:  # CustomTextCLIP keeps its text tower in model.text
        torch.manual_seed(1)
        model = open_clip.create_model(TINY_CLIP, pretrained=None, force_custom_text=True).eval()
        tok = open_clip.get_tokenizer(TINY_CLIP)
        assert hasattr(model, "text")
    coop = CoOp(model, NAMES, CoOpConfig(ctx_init="a photo of a"), tokenizer=tok)
    assert coop.n_ctx == 4 and coop.ctx.shape == (4, 64)
    with torch.no_grad():
        ours = coop.encode_text()
    ref = _reference(model, tok, [f"a photo of a {n}." for n in CLEAN])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_ctx_init_text_features_equal_encode_text_vitb16(vitb16):
    model, tok = vitb16
    coop = CoOp(model, NAMES[:3], CoOpConfig(ctx_init="a photo of a"), tokenizer=tok)
    with torch.no_grad():
        ours = coop.encode_text()
    ref = _reference(model, tok, [f"a photo of a {n}." for n in CLEAN[:3]])
    assert ours.shape == (3, 512)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position,template", [
    ("front", "{} a photo of a."),    # [SOS] CLASS ctx . [EOS]
    ("middle", "a photo {} of a."),   # [SOS] ctx[:2] CLASS ctx[2:] . [EOS]
])
def test_other_positions_equal_the_reordered_sentence(tiny, position, template):
    coop = CoOp(tiny, NAMES, CoOpConfig(ctx_init="a photo of a", class_token_position=position))
    with torch.no_grad():
        ours = coop.encode_text()
    ref = _reference(tiny.model, tiny.tokenizer, [template.format(n) for n in CLEAN])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_logits_equal_open_clip_get_logits(tiny):
    coop = CoOp(tiny, NAMES, CoOpConfig(ctx_init="a photo of a"))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = coop(images)
        ref_logits, _ = tiny.model.get_logits(images, tiny.tokenizer([f"a photo of a {n}." for n in CLEAN]))
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.logits, tiny.model.logit_scale.exp() * out.cosine)
    torch.testing.assert_close(out.features, tiny.model.encode_image(images))
    assert out.local_cosine is None and out.local_logits is None  # local features are opt-in


def test_local_features_on_request(tiny):
    coop = CoOp(tiny, NAMES, CoOpConfig(n_ctx=3))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = coop(images, local=True)
        g, loc = encode_image_global_local(tiny.model, images)
        text = F.normalize(coop.encode_text(), dim=-1)
    assert out.local_cosine.shape == (2, 16, 4) and out.local_logits.shape == (2, 16, 4)
    torch.testing.assert_close(out.local_cosine, F.normalize(loc, dim=-1) @ text.T)
    torch.testing.assert_close(out.local_logits, tiny.model.logit_scale.exp() * out.local_cosine)
    torch.testing.assert_close(out.cosine, F.normalize(g, dim=-1) @ text.T)
    # the config flag turns it on by default
    assert CoOp(tiny, NAMES, CoOpConfig(n_ctx=3, local_features=True))(images).local_cosine is not None


# ----------------------------------------------------------------------------- token layout
def _layout_case(tiny, position):
    coop = CoOp(tiny, NAMES, CoOpConfig(n_ctx=4, class_token_position=position))
    with torch.no_grad():
        coop.ctx.copy_(torch.arange(4, dtype=torch.float32)[:, None].expand(4, 64) + 100.0)  # markers 100..103
    emb = tiny.model.token_embedding.weight
    enc = tiny.tokenizer.encode
    return coop, emb, enc


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_token_layout(tiny, position):
    coop, emb, enc = _layout_case(tiny, position)
    x = coop.prompt_embeddings().detach()
    tok = tiny.tokenizer
    for k, name in enumerate(CLEAN):
        ids = enc(name)
        n_name = len(ids)
        eot = int(coop.token_ids[k].argmax())
        assert eot == 1 + 4 + n_name + 1  # SOS, 4 ctx, name, ".", then EOT
        assert int(coop.token_ids[k, eot]) == tok.eot_token_id
        if position == "end":
            ctx_pos, name_pos = [1, 2, 3, 4], list(range(5, 5 + n_name))
        elif position == "front":
            name_pos, ctx_pos = list(range(1, 1 + n_name)), list(range(1 + n_name, 5 + n_name))
        else:
            ctx_pos = [1, 2, *range(3 + n_name, 5 + n_name)]
            name_pos = list(range(3, 3 + n_name))
        for j, p in enumerate(ctx_pos):
            assert torch.equal(x[k, p], torch.full((64,), 100.0 + j)), (name, p)
        torch.testing.assert_close(x[k, name_pos], emb[ids], rtol=0, atol=0)
        torch.testing.assert_close(x[k, 0], emb[tok.sot_token_id], rtol=0, atol=0)
        torch.testing.assert_close(x[k, eot - 1], emb[enc(".")[0]], rtol=0, atol=0)
        torch.testing.assert_close(x[k, eot], emb[tok.eot_token_id], rtol=0, atol=0)


def test_class_specific_contexts(tiny):
    coop = CoOp(tiny, NAMES, CoOpConfig(n_ctx=2, class_specific=True))
    assert coop.ctx.shape == (4, 2, 64)
    x = coop.prompt_embeddings()
    for k in range(4):
        torch.testing.assert_close(x[k, 1:3], coop.ctx[k])
    # class 1's text feature depends on its own context only
    coop.encode_text()[1].sum().backward()
    grad = coop.ctx.grad
    assert grad[1].abs().sum() > 0
    assert torch.count_nonzero(grad[[0, 2, 3]]) == 0


def test_class_specific_with_ctx_init_starts_from_the_phrase(tiny):
    coop = CoOp(tiny, NAMES, CoOpConfig(ctx_init="a_photo of a", class_specific=True))
    phrase = tiny.model.token_embedding.weight[tiny.tokenizer.encode("a photo of a")]
    assert coop.ctx.shape == (4, 4, 64)
    for k in range(4):
        assert torch.equal(coop.ctx[k], phrase)
    with torch.no_grad():
        torch.testing.assert_close(coop.encode_text(), _reference(tiny.model, tiny.tokenizer,
                                   [f"a photo of a {n}." for n in CLEAN]), atol=1e-5, rtol=0)


def test_random_init_is_normal_with_init_std(tiny):
    torch.manual_seed(0)
    coop = CoOp(tiny, NAMES, CoOpConfig(n_ctx=16, init_std=0.02))
    assert coop.ctx.shape == (16, 64)
    assert abs(coop.ctx.std().item() - 0.02) < 0.002 and abs(coop.ctx.mean().item()) < 0.002
    # the placeholders are "X" tokens, replaced before the text tower
    assert torch.all(coop.token_ids[:, 1:17] == tiny.tokenizer.encode("X")[0])


# ----------------------------------------------------------------------------- schedule, errors
def test_coop_default_schedule():
    assert [coop_default_schedule(s)["epochs"] for s in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert coop_default_schedule(None)["epochs"] == 50
    sched = coop_default_schedule(16)
    assert sched["lr"] == 0.002 and sched["batch_size"] == 32 and sched["schedule"] == "cosine"
    assert sched["warmup_epochs"] == 1 and sched["warmup_lr"] == 1e-5 and sched["name"] == "sgd"
    optim = OptimConfig(**sched)  # the runner can build its optimiser config from it
    assert optim.momentum == 0.9 and optim.weight_decay == 5e-4 and optim.nesterov is False
    with pytest.raises(ConfigError):
        coop_default_schedule(-1)


def test_config_errors_name_the_key(tiny):
    with pytest.raises(ConfigError, match="nctx.*did you mean 'n_ctx'"):
        create_adapter("coop", tiny, NAMES, {"nctx": 4})
    with pytest.raises(ConfigError, match="class_token_position.*'middel'.*end, middle, front"):
        create_adapter("coop", tiny, NAMES, {"class_token_position": "middel"})
    with pytest.raises(ConfigError, match="n_ctx"):
        create_adapter("coop", tiny, NAMES, {"n_ctx": 0})
    with pytest.raises(ConfigError, match="context length"):
        create_adapter("coop", tiny, NAMES, {"n_ctx": 75})
    with pytest.raises(RegistryError, match="coop, locoop, lora, vpt"):
        create_adapter("cooop", tiny, NAMES)
