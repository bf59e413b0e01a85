"""transformers CLIP checkpoints: conversion parity with transformers' own forward, every way of
naming a checkpoint, tokenizer agreement, preprocessing settings and clear errors."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
import torch.nn.functional as F

from backmix_vlm.errors import ModelError
from backmix_vlm.models.clip import OFFLINE_ENV, TINY_CLIP, TEMPLATES, load_clip
from backmix_vlm.models.hf_clip import (
    HFImageProcessorTransform,
    convert_state_dict,
    find_hf_clip,
    open_clip_config,
    preprocess_settings,
    write_clip_tokenizer_files,
)

transformers = pytest.importorskip("transformers")

# backmix-tiny-clip's geometry, so a config-less HF file can load into the named tiny architecture
TINY = dict(projection_dim=32,
            vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8),
            text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=77))
PROMPTS = ["a photo of a cat.", "a blurry photo of the big aquarium fish.", "a black and white photo of a truck."]


def hf_clip_model(geometry: dict, act: str = "quick_gelu", seed: int = 0):
    """A random transformers CLIPModel; every tensor perturbed so that no bias / norm is trivially 0 or 1."""
    cfg = {k: (dict(v, hidden_act=act) if k.endswith("_config") else v) for k, v in geometry.items()}
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def hf_reference(model, pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
        return {"image": model.get_image_features(pixel_values=pixels).pooler_output,
                "text": model.get_text_features(input_ids=ids).pooler_output,
                "logits": out.logits_per_image}


def ours(bundle, pixels: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    m = bundle.model
    with torch.no_grad():
        image, text = m.encode_image(pixels), m.encode_text(bundle.tokenizer(prompts))
    return {"image": image, "text": text,
            "logits": m.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_clip_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save_pretrained folder of the tiny QuickGELU model (+ a preprocessor config)."""
    folder = tmp_path_factory.mktemp("hf_tiny")
    model = hf_clip_model(TINY)
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return model, folder


def _pixels(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_converted_model_equals_transformers_forward(tmp_path, hf_tokenizer, act):
    model = hf_clip_model(TINY, act)
    model.save_pretrained(tmp_path)
    bundle = load_clip(checkpoint=str(tmp_path))
    pixels = _pixels()
    ids = hf_tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    ref, got = hf_reference(model, pixels, ids), ours(bundle, pixels, PROMPTS)  # each side its own tokenizer
    for key in ("image", "text", "logits"):
        assert got[key].shape == ref[key].shape
        assert torch.allclose(got[key], ref[key], atol=1e-5, rtol=0), (key, (got[key] - ref[key]).abs().max())
    # the activation really is read from the config (QuickGELU vs GELU changes the features)
    acts = {type(m).__name__ for m in bundle.model.modules() if "GELU" in type(m).__name__}
    assert acts == ({"QuickGELU"} if act == "quick_gelu" else {"GELU"})


def test_architecture_comes_from_the_config():
    cfg = open_clip_config(transformers.CLIPConfig(**TINY).to_dict())
    assert cfg["embed_dim"] == 32 and cfg["quick_gelu"] is True
    assert cfg["vision_cfg"] == dict(layers=2, width=64, head_width=16, mlp_ratio=4.0, patch_size=8, image_size=32)
    assert cfg["text_cfg"]["context_length"] == 77 and cfg["text_cfg"]["heads"] == 4
    assert cfg["text_cfg"]["pool_type"] == "argmax"  # eos 49407 is the highest id: first eos == argmax
    odd = dict(TINY, vision_config=dict(TINY["vision_config"], layer_norm_eps=1e-6, num_attention_heads=8))
    cfg = open_clip_config(transformers.CLIPConfig(**odd).to_dict())
    assert cfg["vision_cfg"]["head_width"] == 8 and cfg["vision_cfg"]["norm_kwargs"] == {"eps": 1e-6}
    mixed = dict(TINY, vision_config=dict(TINY["vision_config"], hidden_act="gelu"))
    with pytest.raises(ModelError, match="hidden_act"):
        open_clip_config(transformers.CLIPConfig(**mixed).to_dict())


def test_tokenizers_agree_on_the_prompt_templates(hf_tokenizer):
    import open_clip

    from backmix_vlm.data.classnames import class_names

    classes = class_names("cifar10") + class_names("cifar100")[::7] + ["aquarium fish", "Tiny-ImageNet's pole, (vaulting)"]
    prompts = [t.format(c) for name in TEMPLATES.names() for t in TEMPLATES.get(name) for c in classes]
    ours_ids = open_clip.SimpleTokenizer()(prompts)
    hf_ids = hf_tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    used = ours_ids != 0  # open_clip pads with 0, transformers with <|endoftext|>; pooling stops at the first eos
    assert torch.equal(hf_ids[used], ours_ids[used])
    assert (hf_ids[~used] == hf_tokenizer.pad_token_id).all()


# ----------------------------------------------------------------------------- ways to name a checkpoint
def test_every_checkpoint_form_loads_the_same_weights(saved, tmp_path, monkeypatch):
    model, folder = saved
    pixels = _pixels()
    ref = ours(load_clip(checkpoint=str(folder)), pixels, PROMPTS)

    # the weights file itself (config.json beside it), and the folder named as hf:<folder>
    forms = {"file": load_clip("ViT-B-16", "openai", str(folder / "model.safetensors")),
             "hf_folder": load_clip(f"hf:{folder}")}
    # pytorch_model.bin
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(folder / "config.json", bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    forms["bin"] = load_clip(checkpoint=str(bin_dir))
    # sharded save
    shard_dir = tmp_path / "sharded"
    model.save_pretrained(shard_dir, max_shard_size="100KB")
    assert (shard_dir / "model.safetensors.index.json").is_file()
    forms["sharded"] = load_clip(checkpoint=str(shard_dir))
    # a snapshot in the local Hugging Face cache, resolved offline
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-clip" / "snapshots" / "0123abcd"
    shutil.copytree(folder, snap)
    (cache / "models--acme--tiny-clip" / "refs").mkdir()
    (cache / "models--acme--tiny-clip" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv(OFFLINE_ENV, "1")
    forms["cache"] = load_clip("hf:acme/tiny-clip", cache_dir=str(cache))
    assert forms["cache"].name == "hf:acme/tiny-clip"
    for name, bundle in forms.items():
        got = ours(bundle, pixels, PROMPTS)
        for key in ref:
            assert torch.allclose(got[key], ref[key], atol=1e-6), (name, key)


def test_a_transformers_file_without_config_loads_into_the_named_architecture(tmp_path):
    from safetensors.torch import save_file

    model = hf_clip_model(TINY, "gelu")  # backmix-tiny-clip (no tag) is a GELU model of this geometry
    lone = tmp_path / "lone.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(lone))
    bundle = load_clip(TINY_CLIP, pretrained=None, checkpoint=str(lone))
    pixels = _pixels()
    ids = bundle.tokenizer(PROMPTS)
    ref, got = hf_reference(model, pixels, ids), ours(bundle, pixels, PROMPTS)
    for key in ref:
        assert torch.allclose(got[key], ref[key], atol=1e-5), key
    with pytest.raises(ModelError, match="not a CLIP state dict for this architecture"):
        load_clip("ViT-B-32", pretrained=None, checkpoint=str(lone))


def test_missing_cached_repo_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"hf:acme/nothing.*unreachable.*Hugging Face cache"):
        load_clip("hf:acme/nothing", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5


def test_bad_checkpoints_are_named(saved, tmp_path):
    _, folder = saved
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        load_clip(f"hf:{empty}")
    (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="not a CLIP config"):
        load_clip(checkpoint=str(empty))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(folder / "config.json", no_weights)
    with pytest.raises(ModelError, match="no weights"):
        load_clip(checkpoint=str(no_weights))
    with pytest.raises(ModelError, match="not part of a transformers CLIPModel"):
        convert_state_dict({"vision_model.head.weight": torch.zeros(1), "text_model.final_layer_norm.weight": torch.ones(1)})
    with pytest.raises(ModelError, match="already names the weights"):
        load_clip(f"hf:{folder}", checkpoint=str(folder))
    # an open_clip file next to an HF config (LAION repos ship both) stays open_clip
    import open_clip
    from safetensors.torch import save_file

    oc_dir = tmp_path / "laion_style"
    oc_dir.mkdir()
    shutil.copy(folder / "config.json", oc_dir)
    oc = open_clip.create_model(TINY_CLIP)
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(oc_dir / "open_clip_model.safetensors"))
    assert find_hf_clip(TINY_CLIP, oc_dir / "open_clip_model.safetensors") is None
    b = load_clip(TINY_CLIP, pretrained=None, checkpoint=str(oc_dir / "open_clip_model.safetensors"))
    assert torch.equal(b.model.visual.proj, oc.visual.proj)


def test_bundle_preprocessing_follows_the_checkpoint(saved):
    from PIL import Image

    _, folder = saved
    b = load_clip(checkpoint=str(folder))
    assert b.image_size == 32 and not b.model.training
    assert not any(p.requires_grad for p in b.model.parameters())
    settings = preprocess_settings(find_hf_clip(None, folder))
    assert (settings.resize, settings.crop, settings.interpolation) == (32, 32, "bicubic")
    img = Image.new("RGB", (48, 40), (200, 30, 60))
    x_openai = b.preprocess_eval(img)
    x_hf = HFImageProcessorTransform(find_hf_clip(None, folder))(img)
    assert x_openai.shape == x_hf.shape == (3, 32, 32)
    assert torch.allclose(x_openai, x_hf, atol=0.02)  # a flat image: both pipelines give the same colour
    assert load_clip(checkpoint=str(folder), precision="bf16").model.visual.proj.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- real sizes (slow)
@pytest.mark.slow
@pytest.mark.parametrize("geometry", ["ViT-B-16"])  # ViT-L-14 (~3 min, 5 GB): scripts/check_hf_clip_parity.py
def test_full_size_geometries_match_transformers(tmp_path, hf_tokenizer, geometry):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "check_hf_clip_parity.py"
    spec = importlib.util.spec_from_file_location("check_hf_clip_parity", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    diffs = script.parity(script.GEOMETRIES[geometry], tmp_path, hf_tokenizer)
    assert max(diffs.values()) <= 1e-5, diffs


def test_zeroshot_job_runs_on_a_transformers_checkpoint(saved, tmp_path):
    from pathlib import Path

    from backmix_vlm import cli

    _, folder = saved
    config = Path(__file__).resolve().parents[1] / "configs" / "zeroshot" / "tiny_demo.yaml"
    rc = cli.main(["zeroshot", str(config), f"run.output_dir={tmp_path}", "run.name=hf", f"model.checkpoint={folder}",
                   "data.max_samples=20", "eval.ood=[{name: demo, split: ood-cifar100, label: c100, max_samples: 20}]"])
    assert rc == 0
    results = json.loads((tmp_path / "hf" / "results.json").read_text())
    assert "c100" in results["results"]


def test_zeroshot_preprocess_key_selects_the_hf_pipeline(saved, tmp_path, capsys):
    from pathlib import Path

    from backmix_vlm import cli
    from backmix_vlm.errors import ModelError

    _, folder = saved
    assert isinstance(load_clip(checkpoint=str(folder), preprocess="hf").preprocess_eval, HFImageProcessorTransform)
    assert not isinstance(load_clip(checkpoint=str(folder)).preprocess_eval, HFImageProcessorTransform)
    with pytest.raises(ModelError, match=r"model.preprocess: 'hf' needs a transformers"):
        load_clip(TINY_CLIP, None, preprocess="hf")
    config = Path(__file__).resolve().parents[1] / "configs" / "zeroshot" / "tiny_demo.yaml"
    small = ["data.max_samples=10", "eval.ood=[{name: demo, split: ood-cifar100, label: c100, max_samples: 10}]"]
    # refused up front, before a run folder exists: the key, the value and what is accepted
    rc = cli.main(["zeroshot", str(config), f"run.output_dir={tmp_path}", "run.name=bad", "model.preprocess=hf", *small])
    assert rc != 0 and "model.preprocess" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    rc = cli.main(["zeroshot", str(config), f"run.output_dir={tmp_path}", "run.name=typo", "model.preprocess=pil", *small])
    assert rc != 0 and "hf_pil" in capsys.readouterr().err
    rc = cli.main(["zeroshot", str(config), f"run.output_dir={tmp_path}", "run.name=hf", f"model.checkpoint={folder}",
                   "model.preprocess=hf", *small])
    assert rc == 0 and (tmp_path / "hf" / "results.json").is_file()
