"""``backmix-vlm train``: train a CNN from scratch (optionally with BackMix), evaluate open-set.

The run directory gets ``config.yaml`` + ``run_info.json`` (what ran), ``last.pt`` (atomic,
every epoch; ``--resume`` continues exactly), ``log.csv`` / ``log.jsonl`` (per epoch),
``results.md`` / ``results.json`` (accuracy + open-set metrics per unknown set and score),
``scores.safetensors`` (per-sample scores) and ``plots/`` (BackMix grid, score histograms).

Known / unknown sets: ``data.protocol`` (e.g. ``cifar10`` split 0: 6 known, 4 unknown
classes) filters the train and test sources to the known classes and evaluates the unknown
classes of the test split; ``eval.ood`` adds whole OOD datasets.

``variants`` runs the same config several times with overrides and writes one comparison
table, e.g. plain vs BackMix in one command (``configs/demo.yaml``)::

    variants:
      plain: [backmix.enabled=false]
      backmix: []
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (BackMixConfig, DataSource, EvalConfig, OptimConfig, RunConfig, ViewsConfig, apply_overrides,
                      build_with_overrides, default_data_root, fill_data_roots, from_dict, load_yaml,
                      to_dict)
from ..errors import ConfigError
from ..runs import CONFIG_FILE, open_run, plan_from_args, record_run, write_json
from ..validation import check_choice

JOB = "train"
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]   # = backmix_vlm.data.CIFAR10_MEAN (kept light to import)
CIFAR10_STD = [0.2470, 0.2435, 0.2616]
COMPARE_METRICS = ("auroc", "fpr95", "oscr")


# ----------------------------------------------------------------------------- config
@dataclass
class TrainSource(DataSource):
    """A :class:`DataSource` whose split defaults to ``train`` (so ``train: {name: demo}`` trains on train)."""

    split: str = "train"


@dataclass
class DataConfig:
    """Training / known test data, the open-set protocol and the input pipeline."""

    train: TrainSource = field(default_factory=lambda: TrainSource(name="cifar10"))
    test: DataSource = field(default_factory=lambda: DataSource(name="cifar10", split="test"))
    protocol: str | None = None        # open-set protocol: cifar10 | cifar+10 | cifar+50 | svhn | mnist | tinyimagenet
    protocol_split: int = 0            # which of its standard splits (0-4)
    image_size: int = 32
    mean: list[float] = field(default_factory=lambda: list(CIFAR10_MEAN))
    std: list[float] = field(default_factory=lambda: list(CIFAR10_STD))
    crop_padding: int | None = None    # RandomCrop padding (default image_size // 8); + horizontal flip
    views: ViewsConfig = field(default_factory=ViewsConfig)  # random crop / flip on the device (auto: crop_flip)
    cache: str = "none"                # none | memory: decode the training set once into a uint8 tensor
    num_workers: int = 2               # training loader workers (decode only; geometry runs on the device)

    def validate(self, where: str = "data") -> None:
        if self.image_size < 8:
            raise ConfigError(f"{where}.image_size: {self.image_size} is not accepted; expected >= 8")
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers: {self.num_workers} is not accepted; expected >= 0")
        if self.crop_padding is not None and self.crop_padding < 0:
            raise ConfigError(f"{where}.crop_padding: {self.crop_padding} is not accepted; expected >= 0 or null")
        check_choice(self.cache, ("none", "memory"), f"{where}.cache")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) != 3 or (key == "std" and any(v <= 0 for v in values)):
                raise ConfigError(f"{where}.{key}: {values} is not accepted; expected 3 numbers"
                                  + (" > 0" if key == "std" else ""))


@dataclass
class ModelConfig:
    name: str = "wrn40_4"              # small_cnn | resnet18_cifar | wrn40_4 (backmix_vlm.models.cnn.CNN_MODELS)
    options: dict[str, Any] = field(default_factory=dict)  # builder options, e.g. {width: 16} / {drop_rate: 0.3}


@dataclass
class AugmentConfig:
    """The batch mixer.  ``backmix`` reads the ``backmix`` section; ``backmix.enabled: false``
    turns it off (plain training) so a sweep can flip one flag."""

    name: str = "backmix"              # backmix | cutout | mixup | cutmix | none
    options: dict[str, Any] = field(default_factory=dict)  # e.g. mixup/cutmix {alpha: 1.0}, cutout {side: 0.5}

    def validate(self) -> None:
        from ..augment.factory import MIXER_NAMES

        check_choice(self.name, MIXER_NAMES, "augment.name")


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data_root: str = field(default_factory=default_data_root)  # every data source without a root reads from here
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    backmix: BackMixConfig = field(default_factory=BackMixConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)   # paper recipe: SGD Nesterov 0.9, lr 0.1, wd 5e-4, cosine, 128
    eval: EvalConfig = field(default_factory=EvalConfig)
    plots: bool = True                 # write plots/ (BackMix grid, score histograms) at the end
    best_metric: str | None = None     # also keep best.pt by this log column (higher = better), e.g. test_acc
    variants: dict[str, list[str]] = field(default_factory=dict)  # name -> overrides; one sub-run each

    def __post_init__(self) -> None:
        fill_data_roots(self, self.data_root)

    @property
    def mixer(self) -> str:
        """The mixer that actually runs (``none`` when BackMix is switched off)."""
        from ..augment.factory import active_mixer

        return active_mixer(self.augment.name, self.backmix.enabled)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """The config and its raw (overridden) mapping, which :func:`variant_configs` builds on.

    Every variant is validated here too; an error caused by a command-line override names it.
    """
    data = load_yaml(path) if path is not None else {}
    overrides = list(overrides or [])
    cfg = build_with_overrides(build_train_config, data, overrides, str(path) if path is not None else "")
    return cfg, apply_overrides(data, overrides)


def build_train_config(data: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a raw mapping, with every variant's config checked as well."""
    cfg = from_dict(TrainConfig, copy.deepcopy(data))
    if cfg.variants:
        variant_configs(cfg, data, where="")
    return cfg


def variant_configs(cfg: TrainConfig, data: dict[str, Any], where: str = "config") -> dict[str, TrainConfig]:
    """One config per ``variants`` entry: the base mapping + that variant's overrides."""
    prefix = f"{where}: " if where else ""
    out: dict[str, TrainConfig] = {}
    for name, overrides in cfg.variants.items():
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise ConfigError(f"{prefix}variants.{name!r} is not a usable folder name")
        bad = [o for o in overrides if o.split("=", 1)[0].strip() in ("variants", "run.output_dir", "run.name")]
        if bad:
            raise ConfigError(f"{prefix}variants.{name} may not override {', '.join(bad)}")
        sub = copy.deepcopy(data)
        sub.pop("variants", None)
        try:
            out[name] = from_dict(TrainConfig, apply_overrides(sub, list(overrides)))
        except ConfigError as e:
            raise ConfigError(f"{prefix}variants.{name}: {e}") from None
    return out


def preflight(cfg: TrainConfig, variants: dict[str, TrainConfig] | None = None) -> None:
    """Check, for every variant, the model name and options and every data source (found, filters
    valid, known classes consistent) before a run folder is created or a step is trained."""
    from ..data import check_dataset
    from ..engine.evaluation import build_scores
    from ..models.cnn import check_cnn

    seen: dict[str, Any] = {}
    for label, c in (variants or {"": cfg}).items():
        where = f"variants.{label}: " if label else ""
        try:
            check_cnn(c.model.name, c.model.options)
        except Exception as e:  # ModelError / RegistryError: name the key
            raise type(e)(f"{where}model: {e}") from None
        train_src, test_src, unknowns = resolve_sources(c)
        keyed = [("data.train", train_src), ("data.test", test_src)]
        keyed += [(f"unknown set '{u.display_name}'", u) for u in unknowns]
        found = {}
        for key, src in keyed:
            ident = repr(src)
            if ident not in seen:
                seen[ident] = check_dataset(src, where=f"{where}{key}")
            found[key] = seen[ident]
        build_scores(c.eval, c.data.std)  # unknown score names / score_params fail now
        n_train, n_test = len(found["data.train"].classes), len(found["data.test"].classes)
        if n_train != n_test:
            raise ConfigError(f"{where}data.test has {n_test} classes but data.train has {n_train}; "
                              "the known test set must use the training classes")


# ----------------------------------------------------------------------------- data
def resolve_sources(cfg: TrainConfig) -> tuple[DataSource, DataSource, list[DataSource]]:
    """(train, known test, unknown sets) after applying ``data.protocol``."""
    d = cfg.data
    train, test, unknowns = d.train, d.test, []
    if d.protocol:
        from ..data import get_protocol

        p = get_protocol(d.protocol, d.protocol_split)
        for key, src in (("train", train), ("test", test)):
            if src.classes is not None:
                raise ConfigError(f"data.{key}.classes is set, but data.protocol '{d.protocol}' chooses the "
                                  "known classes; remove one of them")
        train = dataclasses.replace(train, classes=list(p.known))
        test = dataclasses.replace(test, classes=list(p.known),
                                   label=test.label or f"{test.name} known ({p.name} split {p.split})")
        unknown_label = f"{p.name} unknown (split {p.split})"
        if p.unknown_dataset == p.known_dataset:
            unknowns.append(dataclasses.replace(d.test, classes=list(p.unknown), label=unknown_label))
        else:  # e.g. CIFAR+10: unknown classes come from CIFAR-100
            unknowns.append(DataSource(name=p.unknown_dataset, root=d.test.root, split="test",
                                       classes=list(p.unknown), label=unknown_label,
                                       jpeg_quality=d.test.jpeg_quality))
    unknowns += list(cfg.eval.ood)
    names = [u.display_name for u in unknowns]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"eval.ood: unknown sets need distinct labels; repeated: {', '.join(dupes)} "
                          "(set label: for each)")
    if not unknowns:
        raise ConfigError("no unknown set to evaluate: set data.protocol and/or list datasets in eval.ood")
    return train, test, unknowns


def build_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """Training set (train transform), known test set and unknown sets (eval transform)."""
    from ..augment.geometry import CACHE_CHOICES, train_pipeline
    from ..data import build_dataset, build_transform

    d = cfg.data
    train_src, test_src, unknown_srcs = resolve_sources(cfg)

    def eval_tf(src: DataSource) -> Any:
        return build_transform(d.image_size, False, d.mean, d.std, resize=src.resize)

    check_choice(d.cache, CACHE_CHOICES, "data.cache")
    train_tf, views = train_pipeline(d.views, d.image_size, d.mean, d.std, resize=train_src.resize,
                                     crop_padding=d.crop_padding, uint8=d.cache == "memory")
    train = build_dataset(train_src, train_tf)
    if d.cache == "memory":
        from ..data.memory import InMemoryDataset

        train = InMemoryDataset.decode(train, num_workers=d.num_workers)
    known = build_dataset(test_src, eval_tf(test_src))
    if len(known.classes) != len(train.classes):
        raise ConfigError(f"data.test has {len(known.classes)} classes but data.train has {len(train.classes)}; "
                          "the known test set must use the training classes")
    return {
        "train": train,
        "views": views,
        "train_src": train_src,
        "train_eval": lambda: build_dataset(train_src, eval_tf(train_src)),
        "known": known,
        "unknowns": {src.display_name: build_dataset(src, eval_tf(src)) for src in unknown_srcs},
        "extra_known": {src.display_name: build_dataset(src, eval_tf(src)) for src in cfg.eval.extra_known},
    }


# ----------------------------------------------------------------------------- one run
def train_run(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
              argv: list[str] | None = None) -> dict[str, Any]:
    """Train + evaluate one config into ``run_dir``; returns the results dict (main process)."""
    from accelerate.utils import set_seed

    from ..engine.checkpoint import LAST
    from ..engine.evaluation import SCORES_FILE, OpenSetEvaluator, save_scores
    from ..engine.tasks import ClassifierTask
    from ..engine.trainer import Trainer, build_accelerator
    from ..models.cnn import create_cnn
    from ..report.tables import write_results

    run_dir = Path(run_dir)
    accelerator = build_accelerator(cfg.run)
    if accelerator.is_main_process and not (run_dir / CONFIG_FILE).is_file():  # a variant's folder; open_run did the top
        record_run(run_dir, cfg, JOB, argv)
    data = build_datasets(cfg)
    train = data["train"]
    set_seed(cfg.run.seed)
    model = create_cnn(cfg.model.name, len(train.classes), **cfg.model.options)
    if hasattr(model.backbone, "init_from_data"):  # e.g. airbench's whitening conv: from 5,000 training images
        model.backbone.init_from_data(training_images(train, data["views"], 5000))
    evaluator = OpenSetEvaluator(data["known"], data["unknowns"], cfg.eval, device=accelerator.device,
                                 precision=cfg.run.precision, std=cfg.data.std, fit_set=data["train_eval"],
                                 extra_known=data["extra_known"])
    trainer = Trainer(
        ClassifierTask(model, cfg.data.image_size, cfg.optim.label_smoothing), train, optim=cfg.optim, run=cfg.run, run_dir=run_dir,
        num_classes=len(train.classes), augment=cfg.mixer, backmix=cfg.backmix,
        augment_options=cfg.augment.options, num_workers=cfg.data.num_workers, evaluate=evaluator,
        eval_every=cfg.eval.every, best_metric=cfg.best_metric, meta={"job": JOB, "classes": list(train.classes)},
        accelerator=accelerator, views=data["views"],
    )
    trainer.fit(resume=resume)
    if trainer.epochs_this_call == 0:  # resumed a finished run: nothing trained, evaluate once
        trainer.run_evaluation()
    if not accelerator.is_main_process:
        return {}
    results = {**evaluator.result, "model": cfg.model.name, "augment": cfg.mixer, "epochs": trainer.epoch,
               "train_time_s": round(sum(r.get("time", 0.0) for r in trainer.history), 1),  # all epochs, all resumes
               "final_train": ({k: trainer.history[-1][k] for k in ("train_loss", "train_acc")}
                               if trainer.history else None)}
    title = f"{cfg.model.name} + {cfg.mixer} on {data['train_src'].display_name}"
    write_results(run_dir, results, title=title)
    save_scores(run_dir / SCORES_FILE, evaluator.per_sample,
                {"scores": [s.name for s in evaluator.scores], "unknown_sets": list(data["unknowns"]),
                 "positive": cfg.eval.positive, "epoch": trainer.epoch})
    if cfg.plots:
        from .visualize import write_plots

        write_plots(run_dir, cfg, checkpoint=run_dir / LAST)
    accelerator.print(f"results: {run_dir / 'results.md'}")
    return results


# ----------------------------------------------------------------------------- comparison
def comparison_markdown(results: dict[str, dict[str, Any]], scores: list[str], title: str) -> str:
    """One table per score: model | variant | accuracy | AUROC / FPR95 / OSCR per unknown set."""
    from ..report.tables import paper_table_v

    parts = [f"# {title}"]
    for score in scores:
        rows = [{"setting": f"{res.get('model', '')}, {res.get('epochs', '?')} epochs", "method": name,
                 "results": res, "score": score} for name, res in results.items()]
        parts += [f"## Score: {score}", paper_table_v(rows, metrics=COMPARE_METRICS, digits=2).replace(
            "| Setting | Method |", "| Model | Variant |")]
    parts.append("Values in %; FPR95 lower is better. Each variant's own results.md has every metric.")
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def run_variants(cfg: TrainConfig, data: dict[str, Any], run_dir: Path, *, resume: bool,
                 argv: list[str] | None, where: str) -> dict[str, Any]:
    from ..engine.checkpoint import LAST
    from ..runs import atomic_write_text

    configs = variant_configs(cfg, data, where)
    main_process = int(os.environ.get("RANK", "0")) == 0
    results: dict[str, Any] = {}
    for name, sub in configs.items():
        sub.run.output_dir, sub.run.name = str(run_dir), name
        if main_process:
            print(f"== variant {name} ({sub.model.name} + {sub.mixer}, {sub.optim.epochs} epochs)")
        results[name] = train_run(sub, run_dir / name, resume=resume and (run_dir / name / LAST).is_file(), argv=argv)
    if main_process and results and all(results.values()):
        scores = next(iter(configs.values())).eval.scores
        write_json(run_dir / "results.json", {"variants": results})
        md = comparison_markdown(results, scores, f"Comparison: {', '.join(results)}")
        atomic_write_text(run_dir / "results.md", md)
        print(md)
    return results


# ----------------------------------------------------------------------------- CLI
def main(args: Any) -> int:
    """Validate everything (config, every variant, data, model), then claim the run folder and train."""
    cfg, plan = plan_from_args(JOB, args, build=build_train_config)
    data = to_dict(cfg)
    variants = variant_configs(cfg, data, str(plan.run_dir / CONFIG_FILE)) if cfg.variants else {}
    preflight(cfg, variants)
    with open_run(plan, cfg, sub_configs=variants) as run_dir:
        if cfg.variants:
            run_variants(cfg, data, run_dir, resume=plan.resume, argv=plan.argv, where=str(run_dir / CONFIG_FILE))
        else:
            train_run(cfg, run_dir, resume=plan.resume, argv=plan.argv)
    return 0


def training_images(train: Any, views: Any, n: int) -> Any:
    """``n`` evenly spaced training images in the model's input space (normalised, canonical frame)."""
    import torch

    step = max(1, len(train) // n)
    images = torch.stack([train[i][0] for i in range(0, len(train), step)][:n])
    if images.dtype == torch.uint8:  # data.cache: memory, normalised by the device views
        mean = torch.as_tensor(views.mean).view(1, -1, 1, 1)
        std = torch.as_tensor(views.std).view(1, -1, 1, 1)
        images = (images.float() / 255 - mean) / std
    return images.float()
