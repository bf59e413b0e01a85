"""``backmix-vlm fewshot``: few-shot / full-data prompt tuning with or without BackMix.

For each seed: draw ``data.shots`` images per class (the split is saved as JSON and reused,
so every result can be reproduced and shared), train the adapter (CoOp, LoCoOp, VPT or LoRA) over
the frozen backbone with the shared :class:`~backmix_vlm.engine.trainer.Trainer` — BackMix
alongside the original samples by default, its mask bank fed by attention maps — then
evaluate the known test set against every unknown set.  Seeds are aggregated into
``results.md`` / ``results.json`` (mean ± std); each seed keeps its own run folder
(``seed<k>/``: checkpoint, logs, results, per-sample scores).

Optimizer keys the config leaves out follow CoOp's ViT-B/16 recipe for the shot count
(:func:`backmix_vlm.adapters.coop.coop_default_schedule`): SGD lr 0.002, batch 32, cosine,
one warm-up epoch at 1e-5; 50 / 100 / 200 epochs for 1 / 2-4 / 8-16 shots.  ``method.name: lora``
follows CLIP-LoRA's instead (:func:`backmix_vlm.adapters.lora.lora_default_schedule`: AdamW lr 2e-4,
batch 32, cosine, 500 x shots iterations).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (BackMixConfig, DataSource, EvalConfig, OptimConfig, RunConfig, ViewsConfig,
                      build_with_overrides, default_data_root, fill_data_roots, from_dict, load_yaml)
from ..engine.adapter_task import SaliencyConfig
from ..errors import ConfigError
from ..runs import open_run, plan_from_args
from ..validation import check_choice

JOB = "fewshot"
METHODS = ("coop", "locoop", "vpt", "lora")
FAMILIES = ("clip", "timm")
SHOT_CHOICES = (1, 2, 4, 8, 16)
FROZEN_WEIGHTS = ("compute", "fp32")


@dataclass
class BackboneConfig:
    """The frozen backbone: an open_clip CLIP (CoOp, LoCoOp, VPT) or a timm ViT (VPT)."""

    family: str = "clip"                   # clip | timm
    name: str = "ViT-B-16"                 # open_clip model name (or backmix-tiny-clip) | timm model name
    pretrained: str | None = "openai"      # clip: open_clip tag (null = random init); timm: "timm" (its weights) or null
    checkpoint: str | None = None          # local weights file (clip state dict, or timm-layout safetensors)
    image_size: int | None = None          # timm: input size (default: the model's); clip: fixed by the model
    cache_dir: str | None = None           # open_clip download cache
    options: dict[str, Any] = field(default_factory=dict)  # timm.create_model keywords (e.g. {patch_size: 8, depth: 2})
    frozen_weights: str = "compute"        # compute: frozen weights held in run.precision's dtype (bf16 / fp16) once | fp32: re-cast by autocast every step (official CoOp)

    def validate(self) -> None:
        check_choice(self.family, FAMILIES, "backbone.family")
        check_choice(self.frozen_weights, FROZEN_WEIGHTS, "backbone.frozen_weights")
        if self.family == "clip" and self.options:
            raise ConfigError("backbone.options: only for timm backbones; CLIP architectures are named by backbone.name")


@dataclass
class MethodConfig:
    name: str = "coop"                     # coop | locoop | vpt | lora
    options: dict[str, Any] = field(default_factory=dict)  # the adapter's config: CoOpConfig / LoCoOpConfig / VPTConfig / LoRAConfig fields

    def validate(self) -> None:
        check_choice(self.name, METHODS, "method.name")


@dataclass
class FewShotDataConfig:
    train: DataSource = field(default_factory=lambda: DataSource(name="cifar10", split="train"))
    test: DataSource = field(default_factory=lambda: DataSource(name="cifar10", split="test"))
    shots: int | str = 16                  # 1 | 2 | 4 | 8 | 16 (any k >= 1 works) | full
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    split_dir: str | None = None           # where split JSON files live (default: <output_dir>/splits, shared by runs)
    views: ViewsConfig = field(default_factory=ViewsConfig)  # random geometry on the device (auto: RandomResizedCrop + flip above 64 px)
    num_workers: int = 2

    def validate(self) -> None:
        if isinstance(self.shots, str) and self.shots != "full":
            raise ConfigError(f"data.shots: {self.shots!r} is not accepted; use a number of images per class "
                              f"({', '.join(map(str, SHOT_CHOICES))}) or 'full'")
        if isinstance(self.shots, int) and self.shots < 1:
            raise ConfigError(f"data.shots: {self.shots} is not accepted; use k >= 1 or 'full'")
        if not self.seeds:
            raise ConfigError("data.seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"data.seeds: {self.seeds} repeats a seed; each seed is one run folder seed<k>/")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: {self.num_workers} is not accepted; expected >= 0")

    @property
    def shots_per_class(self) -> int | None:
        return None if self.shots == "full" else int(self.shots)


@dataclass
class FewShotEvalConfig(EvalConfig):
    ood: list[DataSource] = field(default_factory=lambda: [DataSource(name="cifar100"), DataSource(name="svhn")])
    scores: list[str] = field(default_factory=lambda: ["mcm", "glmcm", "msp", "energy"])


@dataclass
class FewShotConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data_root: str = field(default_factory=default_data_root)  # every data source without a root reads from here
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: FewShotDataConfig = field(default_factory=FewShotDataConfig)
    backmix: BackMixConfig = field(default_factory=BackMixConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: FewShotEvalConfig = field(default_factory=FewShotEvalConfig)
    setting: str | None = None             # row label in combined tables (default: "<k>-shot" / "Full-data")

    def __post_init__(self) -> None:
        fill_data_roots(self, self.data_root)

    @property
    def setting_label(self) -> str:
        if self.setting:
            return self.setting
        k = self.data.shots_per_class
        return "Full-data" if k is None else f"{k}-shot"

    @property
    def method_label(self) -> str:
        name = {"coop": "CoOp", "locoop": "LoCoOp", "vpt": "VPT", "lora": "LoRA"}[self.method.name]
        return f"{name} + BackMix" if self.backmix.enabled else name


def load_fewshot_config(path: str | Path | None, overrides: list[str] | None = None) -> FewShotConfig:
    """Load the YAML; optimizer keys it leaves out follow CoOp's recipe for its shot count
    (``method.name: lora``: CLIP-LoRA's, :func:`~backmix_vlm.adapters.lora.lora_default_schedule`).

    An error caused by a command-line override names that override.
    """
    data = load_yaml(path) if path is not None else {}
    return build_with_overrides(build_fewshot_config, data, list(overrides or []), str(path) if path is not None else "")


def build_fewshot_config(data: dict[str, Any]) -> FewShotConfig:
    """A :class:`FewShotConfig` from a raw mapping (CoOp's optimizer defaults filled in, the
    adapter options and the backbone / method pairing checked)."""
    from ..adapters.coop import coop_default_schedule

    data = copy.deepcopy(data)
    shots = from_dict(FewShotDataConfig, copy.deepcopy(data.get("data") or {}), "data").shots_per_class
    if not isinstance(data.get("optim", {}), dict):
        raise ConfigError("optim: expected a mapping")
    data["optim"] = {**_default_schedule(data, shots, coop_default_schedule), **(data.get("optim") or {})}
    cfg = from_dict(FewShotConfig, data)
    adapter_config(cfg)  # validate method.options now, not after the backbone has loaded
    if cfg.backbone.family != "clip" and cfg.method.name not in ("vpt", "lora"):
        raise ConfigError(f"method.name: {cfg.method.name} needs a CLIP text tower; use backbone.family=clip "
                          "(timm backbones support methods vpt and lora)")
    if not cfg.eval.ood:
        raise ConfigError("eval.ood: list at least one unknown (OOD) dataset")
    names = [s.display_name for s in cfg.eval.ood]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"eval.ood: unknown sets need distinct labels; repeated: {', '.join(dupes)}")
    return cfg


def preflight(cfg: FewShotConfig) -> None:
    """Check the backbone's name / tag / weights file and every data source before a run folder
    is created or a backbone is loaded."""
    from ..data import check_dataset
    from ..engine.evaluation import build_scores

    build_scores(cfg.eval, None)  # unknown score names / score_params fail now
    b = cfg.backbone
    if b.family == "clip":
        from ..models.clip import check_clip_source

        check_clip_source(b.name, b.pretrained, b.checkpoint, "backbone")
    else:
        from ..models.vit import check_timm_name

        check_timm_name(b.name)
        if b.checkpoint is not None and not Path(b.checkpoint).is_file():
            raise ConfigError(f"backbone.checkpoint: file not found: {b.checkpoint}")
    train = check_dataset(cfg.data.train, "data.train")
    known = check_dataset(cfg.data.test, "data.test")
    if len(known.classes) != len(train.classes):
        raise ConfigError(f"data.test has {len(known.classes)} classes but data.train has {len(train.classes)}")
    for i, src in enumerate(cfg.eval.ood):
        check_dataset(src, f"eval.ood[{i}] ({src.display_name})")


def _default_schedule(data: dict[str, Any], shots: int | None, coop_default: Any) -> dict[str, Any]:
    method = data.get("method") or {}
    if not (isinstance(method, dict) and method.get("name") == "lora"):
        return coop_default(shots)
    from ..adapters.lora import lora_default_schedule

    user = data.get("optim") or {}
    batch = int(user.get("batch_size", 32))
    if shots is None or "epochs" in user:
        return lora_default_schedule(None, None, batch)  # epochs: the user's, or the full-data default
    train = from_dict(FewShotDataConfig, copy.deepcopy(data.get("data") or {}), "data").train
    return lora_default_schedule(shots, _num_classes(train), batch)


def _num_classes(src: DataSource) -> int | None:
    """Classes of a training set without reading it: the kept ``classes`` or the shipped class names."""
    if src.classes is not None:
        return len(src.classes)
    from ..data.classnames import class_names
    from ..errors import DataError

    try:
        return len(class_names(src.name))
    except DataError:
        return None


# ----------------------------------------------------------------------------- backbone
def build_backbone(cfg: FewShotConfig, device: Any) -> dict[str, Any]:
    """The frozen base, its tokenizer (CLIP) and its input normalisation + size."""
    import torch

    b = cfg.backbone
    torch.manual_seed(cfg.run.seed)  # random-init backbones (tests, tiny models) are rebuilt identically by `eval`
    if b.family == "clip":
        from ..models.clip import load_clip

        if b.options:
            raise ConfigError("backbone.options: only for timm backbones; CLIP architectures are named by backbone.name")

        bundle = load_clip(b.name, b.pretrained, b.checkpoint, device=device, cache_dir=b.cache_dir,
                           config_section="backbone")
        if b.image_size is not None and b.image_size != bundle.image_size:
            raise ConfigError(f"backbone.image_size: {b.name} takes {bundle.image_size} px inputs; remove the key")
        hold_frozen_backbone(bundle.model, cfg, device)
        return {"base": bundle, "mean": list(bundle.mean), "std": list(bundle.std), "image_size": int(bundle.image_size),
                "id": {"name": bundle.name, "weights": bundle.pretrained}}
    if cfg.method.name not in ("vpt", "lora"):
        raise ConfigError(f"method.name: {cfg.method.name} needs a CLIP text tower; use backbone.family=clip "
                          "(timm backbones support methods vpt and lora)")
    from ..models.vit import load_timm_vit

    file = b.checkpoint or (b.pretrained if b.pretrained and os.path.isfile(b.pretrained) else None)  # a local file: no hub
    pretrained: Any = file or (True if b.pretrained not in (None, "", "none", "false") else False)
    vit = load_timm_vit(b.name, pretrained=pretrained, img_size=b.image_size, config_section="backbone",
                        **b.options).to(device).eval()
    hold_frozen_backbone(vit.requires_grad_(False), cfg, device)  # the adapter freezes it anyway
    dc = vit.pretrained_cfg or {}
    size = b.image_size or int(vit.patch_embed.img_size[0])
    return {"base": vit, "mean": list(dc.get("mean", (0.485, 0.456, 0.406))),
            "std": list(dc.get("std", (0.229, 0.224, 0.225))), "image_size": size,
            "id": {"name": b.name, "weights": str(pretrained)}}


def hold_frozen_backbone(model: Any, cfg: FewShotConfig, device: Any) -> None:
    """With ``backbone.frozen_weights: compute`` and a bf16 / fp16 run, hold the frozen backbone in
    that dtype once (:func:`backmix_vlm.models.frozen.hold_frozen_in`), before any adapter is built,
    so every seed's adapter (and ``eval``) sees the same weights."""
    from ..models.frozen import frozen_compute_dtype, hold_frozen_in

    if cfg.backbone.frozen_weights == "compute":
        hold_frozen_in(model, frozen_compute_dtype(cfg.run.precision, device))


def adapter_config(cfg: FewShotConfig) -> Any:
    """``method.options`` as the adapter's config dataclass (unknown keys fail by name)."""
    from ..adapters import ADAPTERS

    options = dict(cfg.method.options)
    if cfg.method.name in ("coop", "locoop") and "glmcm" in cfg.eval.scores:
        options.setdefault("local_features", True)  # GL-MCM reads per-patch cosines
    return from_dict(ADAPTERS.get(cfg.method.name).config_class, options, "method.options")


# ----------------------------------------------------------------------------- data
def build_datasets(cfg: FewShotConfig, backbone: dict[str, Any]) -> dict[str, Any]:
    from ..augment.geometry import train_pipeline
    from ..data import build_dataset, build_transform

    size, mean, std = backbone["image_size"], backbone["mean"], backbone["std"]

    def eval_tf(src: DataSource) -> Any:
        return build_transform(size, False, mean, std, resize=src.resize)

    train_tf, views = train_pipeline(cfg.data.views, size, mean, std, resize=cfg.data.train.resize)
    train = build_dataset(cfg.data.train, train_tf)
    known = build_dataset(cfg.data.test, eval_tf(cfg.data.test))
    if len(known.classes) != len(train.classes):
        raise ConfigError(f"data.test has {len(known.classes)} classes but data.train has {len(train.classes)}")
    if not cfg.eval.ood:
        raise ConfigError("eval.ood: list at least one unknown (OOD) dataset")
    names = [s.display_name for s in cfg.eval.ood]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"eval.ood: unknown sets need distinct labels; repeated: {', '.join(dupes)}")
    unknowns = {s.display_name: build_dataset(s, eval_tf(s)) for s in cfg.eval.ood}
    return {"train": train, "views": views, "known": known, "unknowns": unknowns,
            "train_eval": lambda: build_dataset(cfg.data.train, eval_tf(cfg.data.train))}


def split_file(cfg: FewShotConfig, run_dir: Path, seed: int) -> Path | None:
    k = cfg.data.shots_per_class
    if k is None:
        return None
    folder = Path(cfg.data.split_dir) if cfg.data.split_dir else Path(cfg.run.output_dir) / "splits"
    classes = cfg.data.train.classes
    tag = "" if classes is None else "_classes" + "-".join(map(str, classes))
    return folder / f"{cfg.data.train.name}_{cfg.data.train.split}{tag}_{k}shot_seed{seed}.json"


# ----------------------------------------------------------------------------- one seed
def run_seed(cfg: FewShotConfig, seed: int, seed_dir: Path, backbone: dict[str, Any], data: dict[str, Any], *,
             accelerator: Any, resume: bool = False) -> dict[str, Any]:
    """Train + evaluate one seed into ``seed_dir``; returns its results dict."""
    from accelerate.utils import set_seed

    from ..adapters import create_adapter
    from ..data import IndexedSubset, fewshot_indices
    from ..engine.adapter_task import AdapterTask
    from ..engine.checkpoint import LAST
    from ..engine.evaluation import SCORES_FILE, OpenSetEvaluator, save_scores
    from ..engine.trainer import Trainer
    from ..models.frozen import trainable_in_fp32
    from ..report.tables import write_results

    seed_dir.mkdir(parents=True, exist_ok=True)
    train_full = data["train"]
    k = cfg.data.shots_per_class
    if k is None:
        train, indices = train_full, None
    else:
        indices = fewshot_indices(train_full.labels, k, seed, split_file(cfg, seed_dir, seed),
                                  dataset=f"{cfg.data.train.name}/{cfg.data.train.split}",
                                  class_names=train_full.classes)
        train = IndexedSubset(train_full, indices)
    set_seed(seed)
    adapter = create_adapter(cfg.method.name, backbone["base"], train_full.classes, adapter_config(cfg))
    adapter = trainable_in_fp32(adapter.to(accelerator.device))  # fp32 weights and optimizer state
    run_cfg = dataclasses.replace(cfg.run, seed=seed)
    def fit_set() -> Any:  # the training images under the eval transform (Mahalanobis statistics)
        full = data["train_eval"]()
        return full if indices is None else IndexedSubset(full, indices)

    evaluator = OpenSetEvaluator(data["known"], data["unknowns"], cfg.eval, device=accelerator.device,
                                 precision=cfg.run.precision, std=backbone["std"], fit_set=fit_set)
    task = AdapterTask(adapter, backbone["image_size"], cfg.saliency, cfg.run.precision)
    trainer = Trainer(task, train, optim=cfg.optim, run=run_cfg, run_dir=seed_dir, num_classes=len(train_full.classes),
                      augment="backmix" if cfg.backmix.enabled else "none", backmix=cfg.backmix,
                      num_workers=cfg.data.num_workers, evaluate=evaluator, eval_every=cfg.eval.every,
                      meta={"job": JOB, "seed": seed, "classes": list(train_full.classes),
                            "adapter": {"method": cfg.method.name, "config": dataclasses.asdict(adapter_config(cfg))}},
                      accelerator=accelerator, views=data["views"])
    trainer.fit(resume=resume and (seed_dir / LAST).is_file())
    if trainer.epochs_this_call == 0:  # resumed a finished run: evaluate once (every process agrees on this)
        trainer.run_evaluation()
    results = {**evaluator.result, "seed": seed, "shots": cfg.data.shots, "method": cfg.method_label,
               "num_train": len(train), "epochs": trainer.epoch,
               "train_time_s": round(sum(r.get("time", 0.0) for r in trainer.history), 1),  # all epochs, all resumes
               "trainable_parameters": sum(p.numel() for p in task.trainable_parameters())}
    if accelerator.is_main_process:
        write_results(seed_dir, results, title=f"{cfg.method_label}, {cfg.setting_label}, seed {seed}")
        save_scores(seed_dir / SCORES_FILE, evaluator.per_sample,
                    {"scores": [s.name for s in evaluator.scores], "unknown_sets": list(data["unknowns"]),
                     "positive": cfg.eval.positive, "epoch": trainer.epoch})
    return results


def run_fewshot(cfg: FewShotConfig, run_dir: str | Path, *, resume: bool = False,
                reuse_finished: bool | None = None) -> dict[str, Any]:
    """Every seed, then the mean ± std table; returns the aggregated results.

    With ``resume`` a seed that already has ``results.json`` is reused (``reuse_finished``,
    default ``resume``; False when a resume changed settings: finished seeds continue then).
    """
    reuse_finished = resume if reuse_finished is None else reuse_finished
    import json

    from ..engine.trainer import build_accelerator
    from ..report.tables import aggregate_seeds, paper_table_v, write_results
    from ..runs import atomic_write_text

    run_dir = Path(run_dir)
    accelerator = build_accelerator(cfg.run)
    backbone = build_backbone(cfg, accelerator.device)
    data = build_datasets(cfg, backbone)
    per_seed = []
    for seed in cfg.data.seeds:
        seed_dir = run_dir / f"seed{seed}"
        done = seed_dir / "results.json"
        if resume and reuse_finished and done.is_file():
            accelerator.print(f"== seed {seed}: already finished, reusing {done}")
            per_seed.append(json.loads(done.read_text()))
            continue
        accelerator.print(f"== {cfg.method_label}, {cfg.setting_label}, seed {seed}")
        per_seed.append(run_seed(cfg, seed, seed_dir, backbone, data, accelerator=accelerator, resume=resume))
    agg = aggregate_seeds([{k: r[k] for k in ("acc", "results")} for r in per_seed])
    agg.update({"setting": cfg.setting_label, "method": cfg.method_label, "seeds": list(cfg.data.seeds),
                "backbone": backbone["id"], "per_seed": [{k: r.get(k) for k in ("seed", "acc", "train_time_s")}
                                                         for r in per_seed]})
    if accelerator.is_main_process:
        title = f"{cfg.method_label}, {cfg.setting_label} ({len(per_seed)} seed{'s' * (len(per_seed) > 1)})"
        write_results(run_dir, agg, title=title)
        table = paper_table_v([{"setting": cfg.setting_label, "method": cfg.method_label, "results": agg,
                                "score": cfg.eval.scores[0]}])
        atomic_write_text(run_dir / "table_v_row.md", table)
    return agg


def main(args: Any) -> int:
    """Validate everything (config, backbone name, data), then claim the run folder and train."""
    from ..report.tables import results_to_markdown

    cfg, plan = plan_from_args(JOB, args, build=build_fewshot_config)
    preflight(cfg)
    with open_run(plan, cfg) as run_dir:
        agg = run_fewshot(cfg, run_dir, resume=plan.resume, reuse_finished=not plan.changes)
    print(results_to_markdown(agg, title=f"{cfg.method_label}, {cfg.setting_label}"))
    print(f"results: {run_dir / 'results.md'}")
    return 0
