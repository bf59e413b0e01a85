"""``backmix-vlm eval <run-dir> [overrides]``: re-evaluate a trained run's checkpoint.

Works for ``train`` and ``fewshot`` runs.  The run's resolved ``config.yaml`` is reloaded, ``overrides`` applied (e.g. other scores
``eval.scores=[msp,odin,mahalanobis]``, other unknown sets ``eval.ood=[...]``, another
protocol split), the model rebuilt and its ``last.pt`` weights loaded.  Results go into a
new ``<run-dir>/eval-<timestamp>/`` (config.yaml, run_info.json, results.md / .json,
scores.safetensors), so the training results are never overwritten; the folder is printed at
the end and removed again if the evaluation fails.  A checkpoint from a run that has not
finished (fewer epochs than configured, or still running) is evaluated with a warning.  A
comparison run (``variants``) is re-evaluated variant by variant, with a comparison table on top.
Under ``torchrun`` / ``accelerate launch`` each process scores its share of every set and the main
process alone writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..jobs.runs import fresh_output_dir, run_status, unique_subdir
from ..jobs.train import load_overridden
from ..ood.shards import SINGLE, Processes, launched_processes, process_device
from ..runtime import resolve_device

JOB = "eval"
__all__ = ["JOB", "load_overridden", "warn_if_unfinished", "evaluate_run", "evaluate_fewshot_run", "main"]


def warn_if_unfinished(run_dir: Path, checkpoint: Path, epoch: int, epochs: int) -> None:
    """Print a warning when ``checkpoint`` is not the end of its training run."""
    import sys

    status = run_status(run_dir)
    why = []
    if epoch < epochs:
        why.append(f"it holds epoch {epoch} of {epochs}")
    if status in ("running", "interrupted", "failed"):
        why.append(f"the run is {status}")
    if why:
        print(f"warning: {checkpoint} is from an unfinished run ({'; '.join(why)}); these results describe that "
              "intermediate model", file=sys.stderr)


def evaluate_run(cfg: Any, checkpoint: Path, out_dir: Path, argv: list[str] | None = None,
                 processes: Processes = SINGLE) -> dict[str, Any] | None:
    """Load ``checkpoint`` into the configured model, evaluate, write results into ``out_dir``
    (main process; the others return None)."""
    from ..engine.checkpoint import load_checkpoint, load_model_state_dict
    from ..jobs.runs import record_run
    from ..jobs.train import build_datasets, build_model, check_method, eval_config
    from ..ood.open_set import OpenSetEvaluator
    from ..report.finish import finish_evaluation

    state = load_checkpoint(checkpoint, require=("model",))
    epoch = int(state.get("epoch", 0))
    if processes.is_main:
        warn_if_unfinished(checkpoint.parent, checkpoint, epoch, cfg.optim.epochs)
    data = build_datasets(cfg)
    classes = state.get("meta", {}).get("classes") or data.train.classes
    if len(classes) != len(data.train.classes):
        raise ConfigError(f"{checkpoint} was trained on {len(classes)} classes, the config now gives "
                          f"{len(data.train.classes)}; overrides may not change the known classes")
    device = process_device(resolve_device(cfg.run.device))
    model = build_model(cfg, len(classes))
    method = check_method(cfg)
    method.attach(model, len(classes))  # a training method's heads (rotation head, ARPL's points)
    load_model_state_dict(model, state["model"], trainable_only=state.get("trainable_only", False), source=checkpoint)
    model.to(device).eval()
    evaluator = OpenSetEvaluator(data.known, data.unknowns, eval_config(cfg, method), device=device,
                                 precision=cfg.run.precision, std=cfg.data.std, fit_set=data.train_eval,
                                 extra_known=data.extra_known, processes=processes)
    torch.manual_seed(cfg.run.seed)
    evaluator(model, epoch)
    if evaluator.result is None:
        return None
    record_run(out_dir, cfg, JOB, argv)
    results = {**evaluator.result, "model": cfg.model.name, "augment": cfg.mixer, "epochs": epoch,
               "checkpoint": str(checkpoint)}
    return finish_evaluation(out_dir, results, title=f"{cfg.model.name} + {cfg.mixer}, {epoch} epochs: {checkpoint}",
                             evaluator=evaluator, epoch=epoch)


def evaluate_fewshot_run(run_dir: Path, overrides: list[str], out_dir: Path, argv: list[str] | None = None,
                         processes: Processes = SINGLE) -> dict[str, Any] | None:
    """Re-evaluate every seed of a ``fewshot`` run (adapter weights from ``seed<k>/last.pt``)."""
    from ..engine.checkpoint import LAST, load_checkpoint
    from ..jobs.fewshot import build_adapter, build_backbone, build_datasets, load_fewshot_config
    from ..jobs.runs import record_run
    from ..ood.open_set import OpenSetEvaluator
    from ..report.finish import finish_evaluation
    from ..report.tables import aggregate_seeds, write_results

    cfg = load_fewshot_config(run_dir / "config.yaml", overrides)
    ckpts = {seed: run_dir / f"seed{seed}" / LAST for seed in cfg.data.seeds}
    states = {seed: load_checkpoint(ckpt, require=("model",)) for seed, ckpt in ckpts.items()}  # all there?
    for seed, state in states.items():
        if processes.is_main:
            warn_if_unfinished(run_dir, ckpts[seed], int(state.get("epoch", 0)), cfg.optim.epochs)
    device = process_device(resolve_device(cfg.run.device))
    backbone = build_backbone(cfg, device)
    data = build_datasets(cfg, backbone)
    if processes.is_main:
        record_run(out_dir, cfg, JOB, argv)
    per_seed, epochs = [], []
    for seed in cfg.data.seeds:
        ckpt, state = ckpts[seed], states[seed]
        adapter = build_adapter(cfg, backbone, data.train.classes, device)  # as fewshot built it
        adapter.load_state_dict_trainable(state["model"])
        adapter.eval()
        evaluator = OpenSetEvaluator(data.known, data.unknowns, cfg.eval, device=device,
                                     precision=cfg.run.precision, std=backbone.std, fit_set=data.train_eval,
                                     extra_known=data.extra_known, processes=processes)
        torch.manual_seed(seed)
        epoch = int(state.get("epoch", 0))
        epochs.append(epoch)
        evaluator(adapter, epoch)
        if evaluator.result is None:
            continue
        finish_evaluation(out_dir / f"seed{seed}", {**evaluator.result, "seed": seed, "epochs": epoch,
                                                    "checkpoint": str(ckpt)},
                          title=f"{cfg.method_label} on {backbone.name}, {cfg.setting_label}, seed {seed}, "
                                f"{epoch} epochs: {ckpt}", evaluator=evaluator, epoch=epoch)
        per_seed.append(evaluator.result)
    if not processes.is_main:
        return None
    agg = aggregate_seeds([{k: r[k] for k in ("acc", "results")} for r in per_seed])
    agg.update({"backbone": backbone.identity, "epochs": epochs, "seeds": list(cfg.data.seeds)})
    shown = str(epochs[0]) if len(set(epochs)) == 1 else "/".join(map(str, epochs))
    write_results(out_dir, agg, title=f"Re-evaluation: {cfg.method_label} on {backbone.name}, "
                                      f"{cfg.setting_label}, {shown} epochs")
    return agg


def main(args: Any) -> int:
    import json

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    overrides = list(getattr(args, "overrides", []) or [])
    argv = getattr(args, "argv", None)
    info = run_dir / "run_info.json"
    fewshot = info.is_file() and json.loads(info.read_text()).get("job") == "fewshot"
    if fewshot:
        from ..jobs.fewshot import load_fewshot_config

        device = load_fewshot_config(run_dir / "config.yaml", overrides).run.device
    else:
        cfg, data = load_overridden(run_dir, overrides)
        device = cfg.run.device
    processes = launched_processes(process_device(resolve_device(device)))
    out = Path(processes.broadcast(str(unique_subdir(run_dir, "eval")) if processes.is_main else None))
    if not processes.is_main:  # its share of every set; the main process writes
        if fewshot:
            evaluate_fewshot_run(run_dir, overrides, out, argv, processes)
        else:
            _evaluate(cfg, data, run_dir, out, argv, processes)
        return 0
    with fresh_output_dir(out):
        if fewshot:
            evaluate_fewshot_run(run_dir, overrides, out, argv, processes)
        else:
            _evaluate(cfg, data, run_dir, out, argv, processes)
        md = (out / "results.md").read_text()
    print(md)
    print(f"results: {out / 'results.md'}")
    return 0


def _evaluate(cfg: Any, data: dict[str, Any], run_dir: Path, out: Path, argv: list[str] | None,
              processes: Processes) -> None:
    """A train run, or each variant of a comparison run with the comparison table on top."""
    from ..atomic import atomic_write_text, write_json
    from ..engine.checkpoint import LAST
    from ..jobs.train import variant_configs
    from ..report.tables import comparison_markdown

    if not cfg.variants:
        evaluate_run(cfg, run_dir / LAST, out, argv, processes)
        return
    results = {}
    for name, sub in variant_configs(cfg, data, str(run_dir / "config.yaml")).items():
        results[name] = evaluate_run(sub, run_dir / name / LAST, out / name, argv, processes)
    if processes.is_main:
        write_json(out / "results.json", {"variants": results})
        atomic_write_text(out / "results.md", comparison_markdown(results, cfg.eval.scores,
                                                                   f"Re-evaluation: {', '.join(results)}"))
