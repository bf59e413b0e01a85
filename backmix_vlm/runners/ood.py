"""``backmix-vlm ood``: OOD evaluation of any pretrained classifier (timm, torchvision, a run, your module).

The model (``model.source`` + ``model.name``, see :func:`backmix_vlm.models.classifier.load_classifier`)
encodes the ID test set, every OOD set and, when a score or the linear probe needs it, the ID
training set (``train``; ``train.max_samples`` takes an evenly spaced subset) — once each,
cached under ``run.output_dir/.cache/features``.  Every score in ``eval.scores`` then reads
those outputs (:class:`backmix_vlm.ood.Evaluator`).  The run directory gets ``results.md`` /
``results.json`` (ID accuracy, every metric per OOD set and score), ``summary.md`` (FPR95 /
AUROC per OOD set and their average, the literature's table), ``scores.safetensors``
(per-sample scores) and ``plots/score_hist_<set>.png``, as the other jobs.

The run folder belongs to this run (:mod:`backmix_vlm.jobs.runs`): a new run into a folder that holds
a finished run refuses unless ``--overwrite``; a failing command leaves no folder behind.
The config lives in :mod:`backmix_vlm.jobs.ood`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import DataSource, to_dict
from ..errors import ConfigError
from ..jobs.data import check_distinct_sets
from ..jobs.ood import (DEFAULT_SCORES, JOB, RANDOM_WEIGHTS_WARNING, OodConfig, OodEvalConfig, OodModelConfig,
                        ProbeConfig, build_ood_config, load_model, preflight, random_weights)
from ..jobs.runs import open_run, plan_from_args
from ..runtime import resolve_device

__all__ = ["JOB", "DEFAULT_SCORES", "OodModelConfig", "ProbeConfig", "OodEvalConfig", "OodConfig", "build_ood_config",
           "preflight", "load_model", "run_ood", "main"]


def run_ood(cfg: OodConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """Evaluate ``cfg`` into ``run_dir`` (results.md / .json, scores.safetensors, plots); return the results
    (None off the main process of a multi-process launch: each process runs its share of every set)."""
    import torch

    from ..data import build_dataset, build_transform
    from ..ood.evaluator import Evaluator
    from ..ood.shards import launched_processes, process_device
    from ..report.finish import finish_evaluation

    check_distinct_sets(cfg.data, cfg.eval.ood, reserved=("train",))
    run_dir = Path(run_dir)
    device = process_device(resolve_device(cfg.run.device))
    processes = launched_processes(device)
    torch.manual_seed(cfg.run.seed)  # random-init models are reproducible
    loaded = load_model(cfg)

    def tf(src: DataSource) -> Any:
        return build_transform(loaded.image_size, False, loaded.mean, loaded.std, resize=src.resize,
                               interpolation=cfg.model.interpolation)

    def data_id(src: DataSource, ds: Any) -> dict[str, Any]:
        return {**to_dict(src), "root": str(Path(src.root).resolve()), "n": len(ds), "transform": repr(ds.transform)}

    known = build_dataset(cfg.data, tf(cfg.data))
    ood_sets = {s.display_name: build_dataset(s, tf(s)) for s in cfg.eval.ood}
    ids = {"known": data_id(cfg.data, known), **{s.display_name: data_id(s, ood_sets[s.display_name])
                                                  for s in cfg.eval.ood}}
    train = None
    if cfg.train is not None:
        train = build_dataset(cfg.train, tf(cfg.train))
        ids["train"] = data_id(cfg.train, train)
        if len(train.classes) != len(known.classes):
            raise ConfigError(f"train has {len(train.classes)} classes but data has {len(known.classes)}; "
                              f"the ID training and test sets must share their classes")
    ev = Evaluator(loaded.model, known, ood_sets, train_data=train, device=device, precision=cfg.run.precision,
                   batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers,
                   cache_dir=Path(cfg.run.output_dir) / ".cache" / "features" if cfg.eval.cache_features else None,
                   model_id=loaded.identity | ({"weights": _weights_id(loaded)}), data_ids=ids,
                   probe=cfg.probe.enabled, probe_C=cfg.probe.C, probe_max_iter=cfg.probe.max_iter,
                   positive=cfg.eval.positive, std=loaded.std, seed=cfg.run.seed, processes=processes,
                   table=cfg.eval.table())
    results = ev.run(cfg.eval.scores, cfg.eval.score_params)
    if results is None:
        return None
    results["known"] = cfg.data.display_name
    results["model"] = {k: v for k, v in loaded.identity.items() if v not in (None, {}, [])}
    if random_weights(cfg.model):
        results["weights"] = "random (untrained: no model.pretrained, no model.checkpoint)"
    return finish_evaluation(run_dir, results, title=_title(cfg, results), evaluator=ev, summary=True,
                             plots=cfg.plots)


def _weights_id(loaded: Any) -> str:
    from ..ood.features import model_fingerprint

    return model_fingerprint(loaded.model)


def _title(cfg: OodConfig, results: dict[str, Any]) -> str:
    m = cfg.model
    what = Path(m.name).name if m.source == "run" else m.name
    weights = m.checkpoint and Path(m.checkpoint).name or ("pretrained" if m.pretrained else "")
    if random_weights(m):
        weights = "RANDOM WEIGHTS, numbers mean nothing"
    probe = ", linear probe" if results.get("probe") else ""
    return f"OOD: {m.source} {what}{f' ({weights})' if weights else ''}{probe}: {cfg.data.display_name} vs unknowns"


def main(args: argparse.Namespace) -> int:
    """CLI entry: validate config, model and data; then claim the run folder, evaluate, print the table."""
    from ..report.tables import results_to_markdown

    cfg, plan = plan_from_args(JOB, args, build=build_ood_config, can_resume=False)
    preflight(cfg)
    warning = RANDOM_WEIGHTS_WARNING.format(name=cfg.model.name) if random_weights(cfg.model) else ""
    if warning:
        print(warning, file=sys.stderr, flush=True)
    with open_run(plan, cfg) as run_dir:
        results = run_ood(cfg, run_dir)
    if results is None:  # not the main process: it writes and prints
        return 0
    print(results_to_markdown(results, title=_title(cfg, results)))
    print(f"results: {run_dir / 'results.md'}")
    if warning:  # again after the table, where the numbers are read
        print(warning, file=sys.stderr)
    return 0
