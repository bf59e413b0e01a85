"""``backmix-vlm fewshot``: few-shot / full-data prompt tuning with or without BackMix.

For each seed: draw ``data.shots`` images per class (the split is saved as JSON and reused,
so every result can be reproduced and shared), train the adapter (CoOp, LoCoOp, VPT or LoRA) over
the frozen backbone with the shared :class:`~backmix_vlm.engine.trainer.Trainer` — BackMix
alongside the original samples by default, its mask bank fed by attention maps — then
evaluate the known test set against every unknown set.  Seeds are aggregated into
``results.md`` / ``results.json`` (mean ± std); each seed keeps its own run folder
(``seed<k>/``: checkpoint, logs, results, per-sample scores).

The config (and CoOp's / CLIP-LoRA's default schedules), the backbone and the datasets are
built by :mod:`backmix_vlm.jobs.fewshot`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..jobs.data import OpenSetData
from ..jobs.fewshot import (JOB, BackboneConfig, FewShotConfig, adapter_config, build_adapter, build_backbone,
                            build_datasets, build_fewshot_config, few_shot_subset, load_fewshot_config, preflight,
                            split_file)
from ..models.backbone import Backbone
from ..jobs.runs import is_main_process, open_run, plan_from_args
from ..runtime import on_main_process, process_group_errors

__all__ = ["JOB", "BackboneConfig", "FewShotConfig", "load_fewshot_config", "build_fewshot_config", "preflight",
           "build_backbone", "adapter_config", "build_datasets", "split_file", "run_seed", "run_fewshot", "main"]


def run_seed(cfg: FewShotConfig, seed: int, seed_dir: Path, backbone: Backbone, data: OpenSetData, *,
             accelerator: Any, resume: bool = False, applied: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Train + evaluate one seed into ``seed_dir``; returns its results dict on the main process
    (which evaluates and writes), None on the others (``applied``: as in ``runners.train.train_run``)."""
    from accelerate.utils import set_seed

    from ..augment import build_mixer
    from ..data import IndexedSubset
    from ..engine.adapter_task import AdapterTask
    from ..engine.checkpoint import LAST
    from ..engine.trainer import Trainer
    from ..ood.open_set import OpenSetEvaluator
    from ..report.finish import finish_evaluation

    if accelerator.is_main_process:  # the main process writes every file
        seed_dir.mkdir(parents=True, exist_ok=True)
    train_full = data.train
    train, indices = few_shot_subset(cfg, train_full, seed, seed_dir)
    set_seed(seed)
    adapter = build_adapter(cfg, backbone, train_full.classes, accelerator.device)
    run_cfg = dataclasses.replace(cfg.run, seed=seed)

    def fit_set() -> Any:  # the training images under the eval transform (Mahalanobis statistics)
        full = data.train_eval()
        return full if indices is None else IndexedSubset(full, indices)

    evaluator = OpenSetEvaluator(data.known, data.unknowns, cfg.eval, device=accelerator.device,
                                 precision=cfg.run.precision, std=backbone.std, fit_set=fit_set,
                                 extra_known=data.extra_known)
    task = AdapterTask(adapter, backbone.image_size, cfg.saliency, cfg.run.precision)
    trainer = Trainer(task, train, optim=cfg.optim, run=run_cfg, run_dir=seed_dir, num_classes=len(train_full.classes),
                      mixer=build_mixer(cfg.augment, cfg.backmix), backmix=cfg.backmix,
                      num_workers=cfg.data.num_workers, evaluate=evaluator, eval_every=cfg.eval.every,
                      meta={"job": JOB, "seed": seed, "classes": list(train_full.classes),
                            "adapter": {"method": cfg.method.name, "config": dataclasses.asdict(adapter_config(cfg))}},
                      accelerator=accelerator, views=data.views)
    trainer.fit(resume=resume and on_main_process((seed_dir / LAST).is_file))
    if trainer.resume_applied and applied is not None:
        applied.update(trainer.resume_applied)
    if trainer.epochs_this_call == 0:  # resumed a finished run: evaluate once (every process agrees on this)
        trainer.run_evaluation()
    if not accelerator.is_main_process:  # only the main process evaluated
        return None
    results = {**evaluator.result, "seed": seed, "shots": cfg.data.shots, "method": cfg.method_label,
               "num_train": len(train), "epochs": trainer.epoch, "processes": accelerator.num_processes,
               "train_time_s": round(sum(r.get("time", 0.0) for r in trainer.history), 1),  # all epochs, all resumes
               "trainable_parameters": sum(p.numel() for p in task.trainable_parameters())}
    finish_evaluation(seed_dir, results, title=f"{cfg.method_label}, {cfg.setting_label}, seed {seed}",
                      evaluator=evaluator, epoch=trainer.epoch)
    return results


def run_fewshot(cfg: FewShotConfig, run_dir: str | Path, *, resume: bool = False,
                reuse_finished: bool | None = None, applied: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every seed, then the mean ± std table; returns the aggregated results (on every process).

    With ``resume`` a seed that already has ``results.json`` is reused (``reuse_finished``,
    default ``resume``; False when a resume changed settings: finished seeds continue then).
    Under several processes every process trains; the main process decides what is reused,
    evaluates, aggregates and writes every file, and its results reach the others.
    """
    reuse_finished = resume if reuse_finished is None else reuse_finished
    import json

    from ..atomic import atomic_write_text
    from ..engine.trainer import build_accelerator
    from ..report.tables import aggregate_seeds, paper_table_v, write_results

    run_dir = Path(run_dir)
    accelerator = build_accelerator(cfg.run)
    backbone = build_backbone(cfg, accelerator.device)
    data = build_datasets(cfg, backbone)
    per_seed = []
    for seed in cfg.data.seeds:
        seed_dir = run_dir / f"seed{seed}"
        done = seed_dir / "results.json"
        finished = on_main_process(lambda: json.loads(done.read_text()) if done.is_file() else None) \
            if resume and reuse_finished else None
        if finished is not None:
            accelerator.print(f"== seed {seed}: already finished, reusing {done}")
            per_seed.append(finished)
            continue
        accelerator.print(f"== {cfg.method_label}, {cfg.setting_label}, seed {seed}")
        own: dict[str, Any] = {}
        per_seed.append(run_seed(cfg, seed, seed_dir, backbone, data, accelerator=accelerator, resume=resume,
                                 applied=own))
        if own and applied is not None:
            applied[f"seed{seed}"] = own

    def aggregate() -> dict[str, Any]:
        agg = aggregate_seeds([{k: r[k] for k in ("acc", "results")} for r in per_seed])
        agg.update({"setting": cfg.setting_label, "method": cfg.method_label, "seeds": list(cfg.data.seeds),
                    "backbone": backbone.identity,
                    "per_seed": [{k: r.get(k) for k in ("seed", "acc", "train_time_s")} for r in per_seed]})
        title = f"{cfg.method_label}, {cfg.setting_label} ({len(per_seed)} seed{'s' * (len(per_seed) > 1)})"
        write_results(run_dir, agg, title=title)
        table = paper_table_v([{"setting": cfg.setting_label, "method": cfg.method_label, "results": agg,
                                "score": cfg.eval.scores[0]}])
        atomic_write_text(run_dir / "table_v_row.md", table)
        return agg

    return on_main_process(aggregate)


def main(args: Any) -> int:
    """Validate everything (config, backbone name, data), then claim the run folder and train."""
    from ..report.tables import results_to_markdown

    cfg, plan = plan_from_args(JOB, args, build=build_fewshot_config)
    preflight(cfg)
    with open_run(plan, cfg) as run_dir, process_group_errors(cfg.run.process_timeout_s):
        agg = run_fewshot(cfg, run_dir, resume=plan.resume, reuse_finished=not plan.changes,
                          applied=plan.applied)
    if is_main_process():
        print(results_to_markdown(agg, title=f"{cfg.method_label}, {cfg.setting_label}"))
        print(f"results: {run_dir / 'results.md'}")
    return 0
