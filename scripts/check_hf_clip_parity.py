"""Parity of the transformers-CLIP conversion at real sizes (random weights; not a benchmark).

For each geometry a randomly initialised transformers ``CLIPModel`` (every tensor perturbed, so
no bias or norm is trivially 0 / 1) is saved with ``save_pretrained``, loaded through
``backmix_vlm.models.clip.load_clip(checkpoint=folder)`` and compared with transformers' own
forward in fp32: image features, text features (prompts of the toolkit's templates, each side
tokenized by its own tokenizer: transformers' ``CLIPTokenizer`` built from open_clip's bundled
BPE, open_clip's ``SimpleTokenizer``) and the logits.

    OMP_NUM_THREADS=2 python scripts/check_hf_clip_parity.py [--geometries tiny ViT-B-16 ViT-L-14]

The slow test ``tests/test_hf_clip.py::test_full_size_geometries_match_transformers`` runs the
same function.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# transformers CLIPConfig fields of the OpenAI checkpoints (openai/clip-vit-base-patch16, -large-patch14)
GEOMETRIES = {
    "tiny": dict(projection_dim=32,
                 vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=32, patch_size=8),
                 text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)),
    "ViT-B-16": dict(projection_dim=512,
                     vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, image_size=224, patch_size=16),
                     text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                      num_attention_heads=8)),
    "ViT-L-14": dict(projection_dim=768,
                     vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                        num_attention_heads=16, image_size=224, patch_size=14),
                     text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12)),
}
PROMPTS = ["a photo of a {}.", "a blurry photo of the big {}.", "a black and white photo of a {}."]
CLASSES = ["cat", "aquarium fish", "pickup truck"]


def parity(geometry: dict, workdir: str | Path, hf_tokenizer=None, seed: int = 0) -> dict[str, float]:
    """Max |ours - transformers| of image features, text features and logits (fp32)."""
    import transformers

    from backmix_vlm.models.clip import load_clip
    from backmix_vlm.models.hf_clip import write_clip_tokenizer_files

    workdir = Path(workdir)
    if hf_tokenizer is None:
        hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(str(write_clip_tokenizer_files(workdir / "tok")))
    cfg = {k: (dict(v, hidden_act="quick_gelu") if k.endswith("_config") else v) for k, v in geometry.items()}
    torch.manual_seed(seed)
    ref_model = transformers.CLIPModel(transformers.CLIPConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    folder = workdir / "model"
    ref_model.save_pretrained(folder)
    size = cfg["vision_config"]["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=g)
    prompts = [t.format(c) for t in PROMPTS for c in CLASSES]
    ids = hf_tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = {"image": ref_model.get_image_features(pixel_values=pixels).pooler_output,
               "text": ref_model.get_text_features(input_ids=ids).pooler_output,
               "logits": ref_model(input_ids=ids, pixel_values=pixels).logits_per_image}
    del ref_model
    bundle = load_clip(checkpoint=str(folder))
    m = bundle.model
    with torch.no_grad():
        image, text = m.encode_image(pixels), m.encode_text(bundle.tokenizer(prompts))
        logits = m.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    got = {"image": image, "text": text, "logits": logits}
    return {k: float((got[k] - ref[k]).abs().max()) for k in ref}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    args = ap.parse_args()
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, fp32, threads {torch.get_num_threads()}")
    print("| geometry | max abs diff image features | text features | logits | time (s) |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for name in args.geometries:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            d = parity(GEOMETRIES[name], tmp)
        worst = max(worst, *d.values())
        print(f"| {name} | {d['image']:.2e} | {d['text']:.2e} | {d['logits']:.2e} | {time.perf_counter() - start:.0f} |",
              flush=True)
    print("PASS (<= 1e-5)" if worst <= 1e-5 else f"FAIL: {worst:.2e} > 1e-5")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
