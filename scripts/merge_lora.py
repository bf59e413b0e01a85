#!/usr/bin/env python
"""Export a trained LoRA (a ``backmix-vlm fewshot`` run with ``method: lora``) as plain weights.

Rebuilds the run's backbone and adapter from its ``config.yaml``, loads the LoRA tensors of
``seed<k>/last.pt``, folds ``B A`` into the weights (:meth:`backmix_vlm.adapters.LoRA.merge`) and
writes a safetensors file with the backbone's own keys: an open_clip ``CLIP`` state dict (load it
with ``backbone.checkpoint=`` / ``open_clip.create_model(name)``), or a timm ViT with the trained
linear head as ``head`` (``timm.create_model(name, num_classes=K)``).  Also writes the adapter
alone (``--adapter-dir``: ``adapter_model.safetensors`` + ``adapter_config.json``).

    python scripts/merge_lora.py runs/table_v/16shot_lora --seed 1 --out merged.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--seed", type=int, default=None, help="default: the run's first seed")
    ap.add_argument("--out", type=Path, required=True, help="merged weights (.safetensors)")
    ap.add_argument("--adapter-dir", type=Path, default=None, help="also save the adapter alone here")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    from backmix_vlm.adapters import LoRA, create_adapter
    from backmix_vlm.engine.checkpoint import LAST, load_checkpoint
    from backmix_vlm.errors import ConfigError
    from backmix_vlm.jobs.fewshot import adapter_config, build_backbone, load_fewshot_config

    cfg = load_fewshot_config(args.run_dir / "config.yaml")
    if cfg.method.name != "lora":
        raise ConfigError(f"{args.run_dir}: method.name is {cfg.method.name!r}, not lora")
    seed = args.seed if args.seed is not None else cfg.data.seeds[0]
    state = load_checkpoint(args.run_dir / f"seed{seed}" / LAST)
    backbone = build_backbone(cfg, torch.device("cpu"))
    classes = state.get("meta", {}).get("classes")
    if not classes:
        raise ConfigError(f"{args.run_dir}: the checkpoint has no class names in its meta")
    adapter = create_adapter("lora", backbone.base, classes, adapter_config(cfg))
    assert isinstance(adapter, LoRA)
    adapter.load_state_dict_trainable(state["model"])
    merged = adapter.merged_state_dict()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backbone": json.dumps(backbone.identity), "classes": json.dumps(classes), "seed": str(seed),
            "lora": json.dumps(state.get("meta", {}).get("adapter"))}
    save_file({k: v.contiguous() for k, v in merged.items()}, str(args.out), metadata=meta)
    print(f"merged {len(merged)} tensors -> {args.out}")
    if args.adapter_dir:
        print(f"adapter -> {adapter.save_adapter(args.adapter_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
