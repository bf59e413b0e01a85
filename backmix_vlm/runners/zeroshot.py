"""``backmix-vlm zeroshot``: zero-shot OOD / open-set evaluation of a frozen CLIP.

The known (ID) test set's class names become prompts; every image of the known set and of
each OOD set is encoded once (global + LoCoOp local features, cached on disk), then every
configured score (MCM, GL-MCM, MSP, MaxLogit, Energy, ODIN, ...) is computed from those
outputs and written as ``results.md`` / ``results.json`` into the run directory.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import torch

from ..config import DataSource, to_dict
from ..errors import ConfigError
from ..jobs.data import check_distinct_sets
from ..jobs.zeroshot import (DEFAULT_SCORES, JOB, ClipModelConfig, ZeroShotConfig, ZeroShotEvalConfig,
                             build_scores, build_zeroshot_config, preflight)
from ..models.clip import ClipZeroShotClassifier, load_clip
from ..jobs.runs import open_run, plan_from_args
from ..runtime import resolve_device

__all__ = ["JOB", "DEFAULT_SCORES", "ClipModelConfig", "ZeroShotEvalConfig", "ZeroShotConfig", "build_scores",
           "build_zeroshot_config", "preflight", "run_zeroshot", "main"]
# what zero-shot scores read (local_logits = logit_scale * local_cosine would double the memory)
OUTPUT_KEEP = ("logits", "features", "cosine", "local_cosine")


def run_zeroshot(cfg: ZeroShotConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """Evaluate ``cfg`` and write results.md / results.json / scores.safetensors into ``run_dir``;
    return the results (None off the main process of a multi-process launch)."""
    from ..data import build_dataset
    from ..models.clip import build_text_features
    from ..models.frozen import compile_frozen_tower, frozen_compute_dtype, hold_frozen_in, shard_batches
    from ..ood.features import cache_file, model_fingerprint
    from ..ood.pipeline import KNOWN, ScoringPipeline
    from ..ood.scores import ScoreSetup, TextSide
    from ..ood.shards import launched_processes, process_device
    from ..report.finish import finish_evaluation
    from ..runtime import low_precision_dtype

    check_distinct_sets(cfg.data, cfg.eval.ood)
    device = process_device(resolve_device(cfg.run.device))
    processes = launched_processes(device)
    torch.manual_seed(cfg.run.seed)  # random-init models (backmix-tiny-clip) are reproducible
    m = cfg.model
    bundle = load_clip(m.name, m.pretrained, m.checkpoint, device=device, precision=m.precision,
                       cache_dir=m.cache_dir, preprocess=m.preprocess)
    scores = build_scores(cfg.eval, bundle.std)
    transform = bundle.preprocess_eval
    known_ds = build_dataset(cfg.data, transform)
    classnames = m.classnames or known_ds.classes
    if len(classnames) != len(known_ds.classes):
        raise ConfigError(f"model.classnames: {len(classnames)} names for the {len(known_ds.classes)} classes "
                          f"of {cfg.data.display_name}")
    clf = ClipZeroShotClassifier(bundle, classnames, m.templates).to(device)
    text = TextSide(lambda words, tpl: build_text_features(bundle, words, tpl), clf.text_features,
                    list(classnames), clf.templates)
    # the frozen image tower in the compute dtype once (bf16 / fp16 weights or run.precision), fused attention;
    # the text tower stays as loaded: text-side score setups (NegLabel) encode with it after the image pass
    hold_frozen_in(bundle.model.visual,
                   low_precision_dtype(m.precision) or frozen_compute_dtype(cfg.run.precision, device))
    if cfg.run.compile:  # fuses the memory-bound work between the matmuls; pays the compile time once
        compile_frozen_tower(bundle.model)
    # each core runs whole forwards of its share of the batch (the ops between the matmuls scale badly over threads)
    shard_batches(clf, cfg.run.eval_workers)

    cache_dir = Path(cfg.run.output_dir) / ".cache" / "features"
    # image tower weights + the exact class embeddings + logit scale = everything outputs depend on
    text_hash = hashlib.sha256(clf.text_features.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    model_id = dict(name=bundle.name, visual=model_fingerprint(bundle.model.visual), text=text_hash,
                    logit_scale=float(clf.logit_scale), precision=cfg.run.precision, transform=repr(transform))
    ood_sets = {src.display_name: build_dataset(src, transform) for src in cfg.eval.ood}
    sources: dict[str, DataSource] = {KNOWN: cfg.data, **{src.display_name: src for src in cfg.eval.ood}}

    def cache(name: str, ds: Any) -> Path | None:
        if not cfg.eval.cache_features:
            return None
        src = sources[name]
        data_id = {**to_dict(src), "root": str(Path(src.root).resolve()), "n": len(ds)}
        return cache_file(cache_dir, src.display_name, model=model_id, data=data_id)

    pipeline = ScoringPipeline(scores, device=device, precision=cfg.run.precision, batch_size=cfg.eval.batch_size,
                               num_workers=cfg.eval.num_workers, keep=OUTPUT_KEEP, positive=cfg.eval.positive,
                               cache=cache, processes=processes, table=cfg.eval.table())
    done = pipeline.run(clf, known_ds, ood_sets, prepare=lambda sets: ScoreSetup(forward=clf, text=text))
    if done is None:
        return None
    results = done.scored.results()
    results["known"] = cfg.data.display_name
    results["model"] = {"name": bundle.name, "pretrained": bundle.pretrained, "templates": list(clf.templates)}
    return finish_evaluation(run_dir, results, title=_title(results), scored=done.scored, summary=True)


def _title(results: dict[str, Any]) -> str:
    m = results["model"]
    return f"Zero-shot {m['name']} ({m['pretrained'] or 'random init'}): {results['known']} vs unknowns"


def main(args: argparse.Namespace) -> int:
    """CLI entry: validate config, model name and data; then record the run, evaluate, print the table."""
    from ..report.tables import results_to_markdown

    cfg, plan = plan_from_args(JOB, args, build=build_zeroshot_config, can_resume=False)
    preflight(cfg)
    with open_run(plan, cfg) as run_dir:
        results = run_zeroshot(cfg, run_dir)
    if results is None:  # not the main process: it writes and prints
        return 0
    print(results_to_markdown(results, title=_title(results)))
    print(f"results: {run_dir / 'results.md'}")
    return 0
