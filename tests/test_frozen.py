"""Frozen towers held in the compute dtype (models/frozen.py): dtypes, fused attention, accuracy, training."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNormFp32, QuickGELU
from torch import nn
from torch.utils.data import Dataset

from backmix_vlm.augment import build_mixer
from backmix_vlm.adapters import create_adapter
from backmix_vlm.config import OptimConfig, RunConfig
from backmix_vlm.engine.adapter_task import AdapterTask, SaliencyConfig
from backmix_vlm.engine.trainer import Trainer
from backmix_vlm.errors import ConfigError
from backmix_vlm.models.clip import TINY_CLIP, ClipZeroShotClassifier, load_clip
from backmix_vlm.models.frozen import (FusedMultiheadAttention, frozen_compute_dtype, frozen_dtypes, hold_frozen_in,
                                       trainable_in_fp32)

BF16 = torch.bfloat16
CLASSES = ["cat", "dog", "car", "ship", "tree", "house", "plane", "bird", "fish", "horse"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip(TINY_CLIP, pretrained=None)


def _held(model: nn.Module, dtype: torch.dtype = BF16) -> nn.Module:
    model = copy.deepcopy(model)
    hold_frozen_in(model, dtype)
    return model


# ----------------------------------------------------------------------------- what is cast
def test_compute_dtype_follows_run_precision():
    assert frozen_compute_dtype("bf16", "cpu") is BF16
    assert frozen_compute_dtype("fp16", "cuda") is torch.float16
    assert frozen_compute_dtype("fp16", "cpu") is None  # no fp16 autocast on CPU
    assert frozen_compute_dtype("no", "cpu") is None and frozen_compute_dtype("fp32") is None
    with pytest.raises(ConfigError, match="precision 'fp8'.*bf16"):
        frozen_compute_dtype("fp8")
    with pytest.raises(ConfigError, match="bfloat16 or float16"):
        hold_frozen_in(nn.Linear(2, 2), torch.float64)


def test_frozen_weights_cast_norms_and_logit_scale_stay_fp32(tiny):
    model = _held(tiny.model)
    keys = set(tiny.model.state_dict())
    assert set(model.state_dict()) == keys  # same names and shapes: checkpoints are unaffected
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, nn.LayerNorm) or name == "logit_scale":
            assert p.dtype == torch.float32, name
        else:
            assert p.dtype == BF16, name
    assert frozen_dtypes(model) == {"frozen bfloat16": frozen_dtypes(model)["frozen bfloat16"],
                                    "frozen float32": sum(p.numel() for n, p in model.named_parameters()
                                                          if p.dtype == torch.float32)}
    # types stay subclasses of the originals (isinstance checks, the relevance extractor)
    attn = model.visual.transformer.resblocks[0].attn
    assert type(attn) is FusedMultiheadAttention and isinstance(attn, nn.MultiheadAttention)
    assert isinstance(model.visual.ln_post, type(tiny.model.visual.ln_post))
    # a second call changes nothing
    before = {n: p.clone() for n, p in model.state_dict().items()}
    assert hold_frozen_in(model, BF16) == 0
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert hold_frozen_in(model, None) == 0


def test_trainable_parameters_are_not_touched():
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    net[0].requires_grad_(False)
    net[1].requires_grad_(False)
    trainable = net[2].weight
    hold_frozen_in(net, BF16)
    assert net[0].weight.dtype == BF16 and net[1].weight.dtype == torch.float32
    assert net[2].weight is trainable and trainable.dtype == torch.float32
    lora = nn.Parameter(torch.zeros(2, 2, dtype=BF16))  # e.g. created in the base's dtype
    holder = nn.Module()
    holder.lora = lora
    trainable_in_fp32(holder)
    assert holder.lora is lora and lora.dtype == torch.float32


# ----------------------------------------------------------------------------- modules
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "float", "bool", "per_head"])
def test_fused_attention_equals_multihead_attention(batch_first, mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    fused = copy.deepcopy(mha)
    fused.__class__ = FusedMultiheadAttention
    n, length = 3, 7
    x = torch.randn(n, length, 32) if batch_first else torch.randn(length, n, 32)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    attn_mask = {None: None, "bool": causal, "float": torch.zeros(length, length).masked_fill(causal, float("-inf")),
                 "per_head": torch.randn(n * 4, length, length)}[mask]
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        out, weights = fused(x, x, x, need_weights=False, attn_mask=attn_mask)
    assert weights is None
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    # what it does not handle goes to torch's forward
    ref_w = mha(x, x, x, need_weights=True)
    got_w = fused(x, x, x, need_weights=True)
    torch.testing.assert_close(got_w[1], ref_w[1])


def test_norms_compute_in_fp32_and_quick_gelu_is_unchanged():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 64).to(BF16)
    ln = nn.LayerNorm(64)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    reference = LayerNormFp32(64)
    reference.load_state_dict(ln.state_dict())
    fp32_ln = copy.deepcopy(ln).requires_grad_(False)
    hold_frozen_in(fp32_ln, BF16)
    out = fp32_ln(x)
    assert out.dtype == BF16 and fp32_ln.weight.dtype == torch.float32
    # open_clip's LayerNormFp32 (cast to fp32, norm, cast back): equal up to the last bf16 rounding
    ref = reference(x)
    assert float((out.float() - ref.float()).abs().max().detach()) <= 2 ** -7 * float(ref.float().abs().max().detach())
    x32 = x.float()
    torch.testing.assert_close(fp32_ln(x32), ln(x32), atol=0, rtol=0)  # fp32 inputs: the original forward
    gelu = nn.Sequential(QuickGELU())
    fast = _held(gelu)
    with torch.no_grad():
        assert torch.equal(fast(x), gelu(x))
    g = x32.clone().requires_grad_(True)
    fast(g).sum().backward()  # with a graph: the original (out-of-place) forward
    assert g.grad is not None


# ----------------------------------------------------------------------------- accuracy
def _accuracy(model: nn.Module, held: nn.Module, images: torch.Tensor, text: torch.Tensor, autocast: bool):
    with torch.no_grad():
        ref = model.encode_image(images)
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            fast = held.encode_image(images)
    cos = F.cosine_similarity(ref, fast.float(), dim=-1)
    text = F.normalize(text, dim=-1)
    agree = ((F.normalize(ref, dim=-1) @ text.T).argmax(1) == (F.normalize(fast.float(), dim=-1) @ text.T).argmax(1))
    return cos, agree.float().mean()


@pytest.mark.parametrize("autocast", [True, False])
def test_tiny_clip_features_match_fp32(tiny, autocast):
    """Per-sample cosine >= 0.999 and zero-shot argmax agreement >= 99 % on random inputs."""
    held = _held(tiny.model)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(256, 3, 32, 32, generator=g)
    with torch.no_grad():
        text = tiny.model.encode_text(tiny.tokenizer([f"a photo of a {c}." for c in CLASSES]))
    cos, agree = _accuracy(tiny.model, held, images, text, autocast)
    assert float(cos.min()) >= 0.999
    assert float(agree) >= 0.99
    with torch.no_grad():  # the text tower too (token embeddings in, no autocast needed)
        held_text = held.encode_text(tiny.tokenizer([f"a photo of a {c}." for c in CLASSES]))
    assert float(F.cosine_similarity(text, held_text.float(), dim=-1).min()) >= 0.999


@pytest.mark.slow
def test_vit_b16_features_match_fp32():
    """The same on a randomly initialised ViT-B/16 (OpenAI architecture, QuickGELU), 32 images."""
    torch.manual_seed(0)
    bundle = load_clip("ViT-B-16", "openai", load_weights=False)
    held = _held(bundle.model)
    images = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        text = bundle.model.encode_text(bundle.tokenizer([f"a photo of a {c}." for c in CLASSES]))
    cos, agree = _accuracy(bundle.model, held, images, text, autocast=True)
    assert float(cos.min()) >= 0.999
    assert float(agree) >= 0.99


def test_zero_shot_head_is_fp32_under_autocast(tiny):
    clf = ClipZeroShotClassifier(dataclasses.replace(tiny, model=_held(tiny.model)), CLASSES[:4])
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        out = clf(torch.randn(3, 3, 32, 32))
    assert out.logits.dtype == out.cosine.dtype == out.local_cosine.dtype == torch.float32
    torch.testing.assert_close(out.logits, clf.logit_scale * out.cosine)


# ----------------------------------------------------------------------------- training
class _Images(Dataset):
    def __init__(self, n: int = 8):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.arange(n) % 4

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), i


@pytest.mark.parametrize("method", ["coop", "vpt"])
def test_training_keeps_trainable_fp32_and_saved_state_unchanged(tiny, tmp_path, method):
    torch.manual_seed(1)
    base = _held(tiny.model)
    options = {"n_ctx": 4} if method == "coop" else {"num_tokens": 2}
    adapter = trainable_in_fp32(create_adapter(method, base, CLASSES[:4], options, tokenizer=tiny.tokenizer))
    torch.manual_seed(1)
    ref = create_adapter(method, copy.deepcopy(tiny.model), CLASSES[:4], options, tokenizer=tiny.tokenizer)
    assert adapter.trainable_parameter_names() == ref.trainable_parameter_names()
    assert all(p.dtype == torch.float32 for p in adapter.trainable_parameters())
    data = _Images()
    task = AdapterTask(adapter, 32, SaliencyConfig(), precision="bf16")
    trainer = Trainer(task, data, optim=OptimConfig(lr=0.01, epochs=1, batch_size=4),
                      run=RunConfig(device="cpu", precision="bf16", seed=5), run_dir=tmp_path,
                      num_classes=4, mixer=build_mixer("backmix"))
    idx = torch.tensor([0, 1, 2, 3])
    stats = trainer.train_step(data.x[idx], data.y[idx], idx)
    assert torch.isfinite(stats["loss"])
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in adapter.trainable_parameters())
    states = [s for group in trainer.optimizer.state.values() for s in group.values() if torch.is_tensor(s)]
    assert states and all(s.dtype == torch.float32 for s in states)  # SGD momentum buffers
    saved = adapter.state_dict_trainable()
    assert {k: (v.dtype, v.shape) for k, v in saved.items()} == {
        k: (torch.float32, v.shape) for k, v in ref.state_dict_trainable().items()}
    assert trainer.bank.bank[idx].ne(0.5).any()  # maps from the held tower reached the bank
    # the held base still classifies like the fp32 one (same trained parameters)
    ref.load_state_dict_trainable(saved)
    adapter.eval(), ref.eval()
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(images)
        with torch.autocast("cpu", dtype=BF16):
            got = adapter(images)
    if method == "coop":  # CLIP heads (cosine, logit scale) in fp32; VPT's linear head follows autocast
        assert got.logits.dtype == torch.float32
    assert float(F.cosine_similarity(got.features.float(), want.features, dim=-1).min()) >= 0.999


def test_fewshot_backbone_option(tmp_path):
    from backmix_vlm.runners.fewshot import build_backbone, load_fewshot_config

    def backbone_dtype(*overrides):
        cfg = load_fewshot_config(None, [f"backbone.name={TINY_CLIP}", "backbone.pretrained=null", *overrides])
        model = build_backbone(cfg, "cpu").base.model
        return model.visual.conv1.weight.dtype, model.visual.ln_post.weight.dtype

    assert backbone_dtype("run.precision=bf16") == (BF16, torch.float32)
    assert backbone_dtype("run.precision=bf16", "backbone.frozen_weights=fp32") == (torch.float32, torch.float32)
    assert backbone_dtype("run.precision=no") == (torch.float32, torch.float32)
    with pytest.raises(ConfigError, match="backbone.frozen_weights"):
        load_fewshot_config(None, ["backbone.frozen_weights=half"])


def test_text_tower_truncated_to_the_last_eot_gives_the_same_features(tiny):
    """CoOp over a held text tower runs positions up to the last EOT only (causal mask + EOT pooling)."""
    from backmix_vlm.adapters.clip_text import encode_text_embeddings

    adapter = create_adapter("coop", tiny, CLASSES, {"n_ctx": 4})
    emb, ids = adapter.prompt_embeddings().detach(), adapter.token_ids
    calls = []
    hook = tiny.model.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    try:
        with torch.no_grad():
            full = encode_text_embeddings(tiny.model, emb, ids)  # fp32 default: all 77 positions
            short = encode_text_embeddings(tiny.model, emb, ids, truncate=True)
    finally:
        hook.remove()
    last = int(ids.argmax(-1).max()) + 1
    first = tiny.model.transformer.batch_first
    assert [(s[0], s[1]) if first else (s[1], s[0]) for s in calls] == [(len(CLASSES), 77), (len(CLASSES), last)]
    assert last < 20
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    held = _held(tiny.model)
    with torch.no_grad():  # auto: on for a held tower
        got = encode_text_embeddings(held, emb, ids)
    assert float(F.cosine_similarity(got.float(), full, dim=-1).min()) > 0.999


def test_keep_freed_memory_stops_page_faults_on_reallocation(monkeypatch):
    import resource
    import sys

    from backmix_vlm import perf

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    monkeypatch.setattr(perf, "_applied", None)
    monkeypatch.setenv(perf.ENV, "default")
    assert perf.keep_freed_memory() is False  # opt-out
    monkeypatch.setattr(perf, "_applied", None)
    monkeypatch.delenv(perf.ENV)
    assert perf.keep_freed_memory() is True and perf.keep_freed_memory() is True

    def forward_like() -> int:  # 12 live 8 MiB activations, then all freed (a forward's pattern)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.ones(2 << 20) for _ in range(12)]
        del xs
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults = [forward_like() for _ in range(5)]
    assert faults[-1] < 0.1 * 12 * 2048  # re-used from the heap; glibc's default re-faults all 24k pages each time

    def cnn_step_like() -> int:  # 64 MiB blocks (a batch-1024 CNN's activations): above any mmap threshold
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.ones(16 << 20) for _ in range(3)]
        del xs
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults = [cnn_step_like() for _ in range(5)]
    assert faults[-1] < 0.1 * 3 * 16384  # M_MMAP_MAX = 0: served from the kept heap too


@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
def test_class_token_only_last_block_gives_the_same_pooled_features(tiny, layout):
    from backmix_vlm.models.clip import encode_image_global_local, set_block_layout
    from backmix_vlm.models.frozen import class_token_only

    held = _held(tiny.model)
    set_block_layout(held, layout)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    last = held.visual.transformer.resblocks[-1]
    outputs, inputs = [], []
    last.register_forward_hook(lambda m, a, out: outputs.append(out.shape))
    last.register_forward_pre_hook(lambda m, a: inputs.append(a[0].shape))
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        full = held.encode_image(images).float()
        with class_token_only(held) as active:
            short = held.encode_image(images).float()
        g, local = encode_image_global_local(held, images)
    assert active
    tokens = 17  # 16 patches + CLS
    seq = 0 if layout == "seq_first" else 1
    assert [s[seq] for s in inputs] == [tokens] * 3  # hooks still see the whole input
    assert [s[seq] for s in outputs] == [tokens, 1, 1]
    assert float(F.cosine_similarity(short, full).min()) > 0.9999
    assert float(F.cosine_similarity(g.float(), full).min()) > 0.9999 and local.shape[1] == 16
    assert last.class_token_only == 0 and "class_token_only" not in last.__dict__  # reset on exit
    with class_token_only(tiny.model) as active:  # not held: nothing changes
        assert not active
