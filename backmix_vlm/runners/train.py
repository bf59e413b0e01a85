"""``backmix-vlm train``: train a CNN from scratch (optionally with BackMix), evaluate open-set.

The run directory gets ``config.yaml`` + ``run_info.json`` (what ran), ``last.pt`` (atomic,
every epoch; ``--resume`` continues exactly), ``log.csv`` / ``log.jsonl`` (per epoch),
``results.md`` / ``results.json`` (accuracy + open-set metrics per unknown set and score),
``scores.safetensors`` (per-sample scores) and ``plots/`` (BackMix grid, score histograms).

Known / unknown sets: ``data.protocol`` (e.g. ``cifar10`` split 0: 6 known, 4 unknown
classes) filters the train and test sources to the known classes and evaluates the unknown
classes of the test split; ``eval.ood`` adds whole OOD datasets.  The config, its loader and
the datasets live in :mod:`backmix_vlm.jobs.train`; ``variants`` there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..config import to_dict
from ..jobs.train import (JOB, OUTLIER_FLAG, TrainConfig, build_datasets, build_model, build_outliers,
                          build_train_config, check_method, eval_config, load_train_config, outlier_seen_sets,
                          preflight, resolve_sources, training_images, variant_configs, write_plots)
from ..jobs.runs import CONFIG_FILE, open_run, plan_from_args, record_run
from ..runtime import process_group_errors

__all__ = ["JOB", "TrainConfig", "load_train_config", "resolve_sources", "variant_configs", "train_run",
           "run_variants", "main"]


def train_run(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
              argv: list[str] | None = None, applied: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train + evaluate one config into ``run_dir``; returns the results dict (main process).

    ``applied`` (a resume) receives the changed optimizer / schedule settings put into the restored
    state (``Trainer.resume_applied``), which the run's ``run_info.json`` records."""
    from accelerate.utils import set_seed

    from ..augment import build_mixer
    from ..engine.checkpoint import LAST
    from ..engine.tasks import ClassifierTask
    from ..engine.trainer import Trainer, build_accelerator
    from ..ood.open_set import OpenSetEvaluator
    from ..report.finish import finish_evaluation

    run_dir = Path(run_dir)
    accelerator = build_accelerator(cfg.run)
    if accelerator.is_main_process and not (run_dir / CONFIG_FILE).is_file():  # a variant's folder; open_run did the top
        record_run(run_dir, cfg, JOB, argv)
    data = build_datasets(cfg)
    train = data.train
    set_seed(cfg.run.seed)
    model = build_model(cfg, len(train.classes))
    if hasattr(model.backbone, "init_from_data"):  # e.g. airbench's whitening conv: from 5,000 training images
        model.backbone.init_from_data(training_images(train, data.views, 5000))
    method = check_method(cfg)
    method.attach(model, len(train.classes))  # the method's own parameters (heads) live in the model
    evaluator = OpenSetEvaluator(data.known, data.unknowns, eval_config(cfg, method), device=accelerator.device,
                                 precision=cfg.run.precision, std=cfg.data.std, fit_set=data.train_eval,
                                 extra_known=data.extra_known)
    trainer = Trainer(
        ClassifierTask(model, cfg.data.image_size, cfg.optim.label_smoothing), train, optim=cfg.optim, run=cfg.run, run_dir=run_dir,
        num_classes=len(train.classes), mixer=build_mixer(cfg.augment, cfg.backmix), backmix=cfg.backmix,
        num_workers=cfg.data.num_workers, evaluate=evaluator,
        eval_every=cfg.eval.every, best_metric=cfg.best_metric, meta={"job": JOB, "classes": list(train.classes)},
        accelerator=accelerator, views=data.views, method=method, outliers=build_outliers(cfg),
    )
    trainer.fit(resume=resume)
    if trainer.resume_applied and applied is not None:
        applied.update(trainer.resume_applied)
    if trainer.epochs_this_call == 0:  # resumed a finished run: nothing trained, evaluate once
        trainer.run_evaluation()
    if not accelerator.is_main_process:
        return {}
    results = {**evaluator.result, "model": cfg.model.name, "augment": cfg.mixer, "epochs": trainer.epoch,
               "method": method.name, "intended_score": method.score,
               "processes": accelerator.num_processes,  # that trained it (evaluation: the main process)
               "train_time_s": round(sum(r.get("time", 0.0) for r in trainer.history), 1),  # all epochs, all resumes
               "final_train": ({k: trainer.history[-1][k] for k in ("train_loss", "train_acc")}
                               if trainer.history else None)}
    seen = outlier_seen_sets(cfg.method.outliers, resolve_sources(cfg)[2])
    if seen:  # OE: these sets share the outlier set's source; never part of a headline number
        results["seen_in_training"] = {name: OUTLIER_FLAG for name in seen}
    finish_evaluation(run_dir, results, title=f"{cfg.model.name} + {cfg.mixer} on {data.train_src.display_name}",
                      evaluator=evaluator, epoch=trainer.epoch)
    if cfg.plots:
        write_plots(run_dir, cfg, checkpoint=run_dir / LAST)
    accelerator.print(f"results: {run_dir / 'results.md'}")
    return results


def run_variants(cfg: TrainConfig, data: dict[str, Any], run_dir: Path, *, resume: bool,
                 argv: list[str] | None, where: str, applied: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each variant into ``run_dir/<name>``, then the comparison table."""
    from ..atomic import atomic_write_text
    from ..engine.checkpoint import LAST
    from ..report.tables import comparison_markdown

    configs = variant_configs(cfg, data, where)
    main_process = int(os.environ.get("RANK", "0")) == 0
    results: dict[str, Any] = {}
    for name, sub in configs.items():
        sub.run.output_dir, sub.run.name = str(run_dir), name
        if main_process:
            print(f"== variant {name} ({sub.model.name} + {sub.mixer}, {sub.optim.epochs} epochs)")
        own: dict[str, Any] = {}
        results[name] = train_run(sub, run_dir / name, resume=resume and (run_dir / name / LAST).is_file(), argv=argv,
                                  applied=own)
        if own and applied is not None:
            applied[name] = own
    if main_process and results and all(results.values()):
        scores = next(iter(configs.values())).eval.scores
        write_json(run_dir / "results.json", {"variants": results})
        md = comparison_markdown(results, scores, f"Comparison: {', '.join(results)}")
        atomic_write_text(run_dir / "results.md", md)
        print(md)
    return results


def main(args: Any) -> int:
    """Validate everything (config, every variant, data, model), then claim the run folder and train."""
    cfg, plan = plan_from_args(JOB, args, build=build_train_config)
    data = to_dict(cfg)
    variants = variant_configs(cfg, data, str(plan.run_dir / CONFIG_FILE)) if cfg.variants else {}
    preflight(cfg, variants)
    with open_run(plan, cfg, sub_configs=variants) as run_dir, process_group_errors(cfg.run.process_timeout_s):
        if cfg.variants:
            run_variants(cfg, data, run_dir, resume=plan.resume, argv=plan.argv, where=str(run_dir / CONFIG_FILE),
                         applied=plan.applied)
        else:
            train_run(cfg, run_dir, resume=plan.resume, argv=plan.argv, applied=plan.applied)
    return 0
