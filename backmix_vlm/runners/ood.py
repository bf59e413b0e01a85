"""``backmix-vlm ood``: OOD evaluation of any pretrained classifier (timm, torchvision, a run, your module).

The model (``model.source`` + ``model.name``, see :func:`backmix_vlm.models.classifier.load_classifier`)
encodes the ID test set, every OOD set and, when a score or the linear probe needs it, the ID
training set (``train``; ``train.max_samples`` takes an evenly spaced subset) — once each,
cached under ``run.output_dir/.cache/features``.  Every score in ``eval.scores`` then reads
those outputs (:class:`backmix_vlm.ood.Evaluator`).  The run directory gets ``results.md`` /
``results.json`` (ID accuracy, every metric per OOD set and score), ``summary.md`` (FPR95 /
AUROC per OOD set and their average, the literature's table), ``scores.safetensors``
(per-sample scores) and ``plots/score_hist_<set>.png``, as the other jobs.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DataSource, EvalConfig, RunConfig, default_data_root, fill_data_roots, load_config, to_dict
from ..errors import ConfigError
from ..runs import make_run_dir, record_run
from ..runtime import resolve_device

JOB = "ood"
DEFAULT_SCORES = ["msp", "maxlogit", "energy", "gen", "mahalanobis", "knn", "vim", "react", "ash_s"]


@dataclass
class OodModelConfig:
    """Which classifier, with which weights (see ``backmix_vlm.models.classifier``)."""

    source: str = "timm"               # timm | torchvision | module | run
    name: str = ""                     # timm / torchvision name, 'package.module:attr', or a train run directory
    pretrained: bool = False           # timm / torchvision weights from their cache (downloaded when online)
    checkpoint: str | None = None      # local weights file (timm: via pretrained_cfg_overlay; never the hub)
    options: dict[str, Any] = field(default_factory=dict)  # create_model / get_model / function kwargs
    image_size: int | None = None      # input side (default: the model's pretrained_cfg, 224, or the run's)
    mean: list[float] | None = None    # normalisation (default: the model's, ImageNet, or the run's)
    std: list[float] | None = None
    interpolation: str = "bicubic"     # resize interpolation: bicubic | bilinear | nearest
    head_layer: str | None = None      # the final linear layer (default: found automatically)
    feature_layer: str | None = None   # take features from this layer's output instead of the head's input


@dataclass
class ProbeConfig:
    """Linear probe (multinomial logistic regression) on frozen features."""

    enabled: bool | None = None        # null: only when the model has no classifier head
    C: float = 1.0                     # inverse L2 strength (scikit-learn)
    max_iter: int = 1000


@dataclass
class OodEvalConfig(EvalConfig):
    scores: list[str] = field(default_factory=lambda: list(DEFAULT_SCORES))


@dataclass
class OodConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: OodModelConfig = field(default_factory=OodModelConfig)
    data: DataSource = field(default_factory=DataSource)   # the known (ID) test set
    train: DataSource | None = None                         # ID training data (fit scores / the probe)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: OodEvalConfig = field(default_factory=OodEvalConfig)
    plots: bool = True
    data_root: str = field(default_factory=default_data_root)  # every data source without a root reads from here

    def __post_init__(self) -> None:
        fill_data_roots(self, self.data_root)


def load_model(cfg: OodConfig) -> Any:
    from ..models.classifier import load_classifier

    m = cfg.model
    loaded = load_classifier(m.source, m.name, pretrained=m.pretrained, checkpoint=m.checkpoint, options=m.options,
                             image_size=m.image_size, head_layer=m.head_layer, feature_layer=m.feature_layer)
    if m.image_size is not None and m.source == "run" and m.image_size != loaded.image_size:
        raise ConfigError(f"model.image_size: the run was trained at {loaded.image_size} px; remove the key")
    if (m.mean is None) != (m.std is None):
        raise ConfigError("model.mean / model.std: give both or neither")
    if m.mean is not None:
        loaded.mean, loaded.std = list(m.mean), list(m.std)  # type: ignore[arg-type]
    return loaded


def run_ood(cfg: OodConfig, run_dir: str | Path) -> dict[str, Any]:
    """Evaluate ``cfg`` into ``run_dir`` (results.md / .json, scores.safetensors, plots); return the results."""
    import torch

    from ..data import build_dataset, build_transform
    from ..engine.evaluation import SCORES_FILE, save_scores
    from ..ood.evaluator import Evaluator
    from ..report.tables import write_results

    if not cfg.eval.ood:
        raise ConfigError("eval.ood: list at least one unknown (OOD) dataset")
    names = [cfg.data.display_name] + [s.display_name for s in cfg.eval.ood]
    dupes = sorted({n for n in names if names.count(n) > 1} | ({"train"} & set(names)))
    if dupes:
        raise ConfigError(f"eval.ood: datasets need distinct labels (and not 'train'); repeated: {', '.join(dupes)}")
    run_dir = Path(run_dir)
    device = resolve_device(cfg.run.device)
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
                   positive=cfg.eval.positive, std=loaded.std, seed=cfg.run.seed)
    results = ev.run(cfg.eval.scores, cfg.eval.score_params)
    results["known"] = cfg.data.display_name
    results["model"] = {k: v for k, v in loaded.identity.items() if v not in (None, {}, [])}
    write_results(run_dir, results, title=_title(cfg, results))
    from ..report.tables import ood_summary_table
    from ..runs import atomic_write_text

    atomic_write_text(run_dir / "summary.md", f"# {_title(cfg, results)}\n\n" + ood_summary_table(results))
    if ev.per_sample:
        save_scores(run_dir / SCORES_FILE, ev.per_sample,
                    {"scores": [s.name for s in ev.scores], "unknown_sets": list(ood_sets),
                     "positive": cfg.eval.positive, "epoch": 0})
        if cfg.plots:
            from .visualize import score_plots

            score_plots(run_dir, run_dir / "plots")
    return results


def _weights_id(loaded: Any) -> str:
    from ..ood.features import model_fingerprint

    return model_fingerprint(loaded.model)


def _title(cfg: OodConfig, results: dict[str, Any]) -> str:
    m = cfg.model
    what = Path(m.name).name if m.source == "run" else m.name
    weights = m.checkpoint and Path(m.checkpoint).name or ("pretrained" if m.pretrained else "")
    probe = ", linear probe" if results.get("probe") else ""
    return f"OOD: {m.source} {what}{f' ({weights})' if weights else ''}{probe}: {cfg.data.display_name} vs unknowns"


def main(args: argparse.Namespace) -> int:
    from ..report.tables import results_to_markdown

    cfg = load_config(OodConfig, args.config, getattr(args, "overrides", None))
    run_dir = make_run_dir(cfg.run.output_dir, cfg.run.name, JOB)
    record_run(run_dir, cfg, JOB, getattr(args, "argv", None))
    results = run_ood(cfg, run_dir)
    print(results_to_markdown(results, title=_title(cfg, results)))
    print(f"results: {run_dir / 'results.md'}")
    return 0
