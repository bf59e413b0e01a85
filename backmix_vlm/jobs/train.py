"""``train`` job: its config (a CNN from scratch, BackMix or a baseline mixer, open-set evaluation),
loader, preflight, datasets and the helpers ``eval`` / ``visualize`` use to re-open a train run.

``variants`` runs the same config several times with overrides and writes one comparison
table, e.g. plain vs BackMix in one command (``configs/demo.yaml``)::

    variants:
      plain: [backmix.enabled=false]
      backmix: []
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import (AugmentConfig, BackMixConfig, DataSource, EvalConfig, OptimConfig, RunConfig, ViewsConfig,
                      apply_overrides, build_with_overrides, default_data_root, fill_data_roots, from_dict, load_yaml,
                      move_data_root)
from ..errors import ConfigError
from ..validation import check_choice

if TYPE_CHECKING:  # imported where used: the config (and a typo in it) is checked without torch
    from .data import OpenSetData

JOB = "train"
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]   # = backmix_vlm.data.CIFAR10_MEAN (kept light to import)
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


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
class MethodConfig:
    """The training method (:mod:`backmix_vlm.engine.methods`): ``plain`` | ``logitnorm`` | ``oe`` | ``rotpred`` |
    ``arpl``, its ``options`` (e.g. ``{temperature: 0.04}``) and, for ``oe``, the auxiliary ``outliers`` set.
    Any mixer (``augment`` / ``backmix``) composes with any method."""

    name: str = "plain"
    options: dict[str, Any] = field(default_factory=dict)
    outliers: DataSource | None = None    # OE's auxiliary outliers, e.g. {name: tinyimagenet, split: val}


OUTLIER_FLAG = "outlier distribution seen in training"


def outlier_seen_sets(outliers: DataSource | None, unknowns: list[DataSource]) -> list[str]:
    """Display names of the unknown sets drawn from the outlier set's source (the same dataset name and
    root, any split or class subset): their results are flagged ``OUTLIER_FLAG`` and kept out of headline means."""
    if outliers is None:
        return []

    def source(src: DataSource) -> tuple[str, str]:
        root = str(Path(src.root).expanduser().resolve()) if src.root else ""
        return src.name.lower().replace("-", "").replace("_", ""), root

    return [u.display_name for u in unknowns if source(u) == source(outliers)]


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data_root: str = field(default_factory=default_data_root)  # every data source without a root reads from here
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    backmix: BackMixConfig = field(default_factory=BackMixConfig)
    method: MethodConfig = field(default_factory=MethodConfig)  # the training method (loss / heads / score)
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
        return self.augment.active(self.backmix.enabled)


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
    """Check, for every variant, the registered names (model, mixer and its options, views) and every
    data source (found, filters valid, known classes consistent) before a run folder is created or a
    step is trained.  (Registered names are checked here, not while the YAML parses, so a typo in a
    key is reported before torch loads.)"""
    from ..augment import build_mixer
    from ..augment.geometry import check_views
    from ..data import check_dataset
    from ..models.cnn import check_cnn
    from ..ood.open_set import build_scores

    seen: dict[str, Any] = {}
    for label, c in (variants or {"": cfg}).items():
        where = f"variants.{label}: " if label else ""
        try:
            check_cnn(c.model.name, c.model.options)
        except Exception as e:  # ModelError / RegistryError: name the key
            raise type(e)(f"{where}model: {e}") from None
        try:
            build_mixer(c.augment, c.backmix)
            check_views(c.data.views)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
        train_src, test_src, unknowns = resolve_sources(c)
        keyed = [("data.train", train_src), ("data.test", test_src)]
        keyed += [(f"unknown set '{u.display_name}'", u) for u in unknowns]
        found = {}
        for key, src in keyed:
            ident = repr(src)
            if ident not in seen:
                seen[ident] = check_dataset(src, where=f"{where}{key}", known=key in ("data.train", "data.test"))
            found[key] = seen[ident]
        method = check_method(c, where)
        if c.method.outliers is not None:
            key = "method.outliers"
            found[key] = check_dataset(c.method.outliers, where=f"{where}{key}", known=False)
        build_scores(eval_config(c, method), c.data.std)  # unknown score names / score_params fail now
        n_train, n_test = len(found["data.train"].classes), len(found["data.test"].classes)
        if n_train != n_test:
            raise ConfigError(f"{where}data.test has {n_test} classes but data.train has {n_train}; "
                              "the known test set must use the training classes")


def check_method(cfg: TrainConfig, where: str = "") -> Any:
    """The configured training method built (an unknown name / option names ``method``); an outlier set
    exactly when the method needs one."""
    from ..engine.methods import build_method

    try:
        method = build_method(cfg.method.name, cfg.method.options)
    except Exception as e:  # RegistryError / ConfigError: name the key
        raise type(e)(f"{where}method: {e}") from None
    if method.needs_outliers and cfg.method.outliers is None:
        raise ConfigError(f"{where}method.outliers: method {method.name} needs an auxiliary outlier dataset, "
                          "e.g. {name: tinyimagenet, split: val}")
    if not method.needs_outliers and cfg.method.outliers is not None:
        raise ConfigError(f"{where}method.outliers: method {method.name} uses no outlier set; remove it")
    return method


def eval_config(cfg: TrainConfig, method: Any) -> EvalConfig:
    """``cfg.eval`` with the method's intended score added to ``scores`` when it is missing."""
    import dataclasses

    if method.score is None or method.score in cfg.eval.scores:
        return cfg.eval
    return dataclasses.replace(cfg.eval, scores=[*cfg.eval.scores, method.score])


# ----------------------------------------------------------------------------- data
def resolve_sources(cfg: TrainConfig) -> tuple[DataSource, DataSource, list[DataSource]]:
    """(train, known test, unknown sets) after applying ``data.protocol``
    (:func:`backmix_vlm.data.open_set_sources`)."""
    from ..data import open_set_sources

    d = cfg.data
    s = open_set_sources(d.train, d.test, protocol=d.protocol, protocol_split=d.protocol_split, ood=cfg.eval.ood)
    return s.train, s.test, s.unknowns


def build_datasets(cfg: TrainConfig) -> OpenSetData:
    """Training set (train transform), known test set, unknown and extra known sets (eval transform)."""
    from ..data import OpenSetSources
    from .data import build_open_set_data

    d = cfg.data
    return build_open_set_data(OpenSetSources(*resolve_sources(cfg)), image_size=d.image_size, mean=d.mean,
                               std=d.std, views=d.views, crop_padding=d.crop_padding, cache=d.cache,
                               num_workers=d.num_workers, extra_known=cfg.eval.extra_known)


def build_outliers(cfg: TrainConfig) -> Any:
    """``method.outliers`` in the training set's form (the same per-sample transform / uint8 cache, so the
    trainer's device views augment and normalise it like the training images), or None."""
    src = cfg.method.outliers
    if src is None:
        return None
    from ..augment.geometry import train_pipeline
    from ..data import build_dataset

    d = cfg.data
    tf, _ = train_pipeline(d.views, d.image_size, d.mean, d.std, resize=src.resize, crop_padding=d.crop_padding,
                           uint8=d.cache == "memory")
    ds = build_dataset(src, tf)
    if d.cache == "memory":
        from ..data.memory import InMemoryDataset

        ds = InMemoryDataset.decode(ds, num_workers=d.num_workers)
    return ds


def build_model(cfg: TrainConfig, num_classes: int) -> Any:
    """The run's CNN (``model.name`` + ``model.options``), freshly initialised: what ``train`` trains
    and ``eval`` loads a checkpoint into."""
    from ..models.cnn import create_cnn

    return create_cnn(cfg.model.name, num_classes, **cfg.model.options)


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


# ----------------------------------------------------------------------------- a saved run
def run_job(run_dir: Path) -> str:
    """The job that wrote ``run_dir`` (``train`` for runs without ``run_info.json``)."""
    info = run_dir / "run_info.json"
    return json.loads(info.read_text()).get("job", "train") if info.is_file() else "train"


def load_run_config(run_dir: Path) -> TrainConfig | None:
    """A run's resolved ``config.yaml`` as a :class:`TrainConfig` (None for runs of other jobs)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml; is this a run directory written by backmix-vlm train?")
    info = run_dir / "run_info.json"
    if info.is_file() and json.loads(info.read_text()).get("job") != "train":
        return None
    return from_dict(TrainConfig, load_yaml(path))


def load_overridden(run_dir: Path, overrides: list[str]) -> tuple[TrainConfig, dict[str, Any]]:
    """A train run's saved config + ``overrides`` (an error names the override), and the raw mapping."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml; pass a run directory written by backmix-vlm train")
    saved = move_data_root(load_yaml(path), list(overrides))  # data_root=... moves every source that read from it
    cfg = build_with_overrides(lambda raw: from_dict(TrainConfig, raw), saved, list(overrides), str(path))
    return cfg, apply_overrides(saved, list(overrides))


def grid_samples(cfg: TrainConfig, checkpoint: Path, num: int) -> dict[str, Any] | None:
    """Mix ``num`` training images of a train run with the checkpoint's bank (None without a bank)."""
    from ..data import build_dataset, build_transform
    from ..report.figures import mix_with_bank

    train_src, _, _ = resolve_sources(cfg)
    d = cfg.data
    ds = build_dataset(train_src, build_transform(d.image_size, False, d.mean, d.std, resize=train_src.resize))
    return mix_with_bank(ds, checkpoint, cfg.augment, cfg.backmix, cfg.run.seed, num)


def write_plots(run_dir: str | Path, cfg: TrainConfig | None = None, *, checkpoint: str | Path | None = None,
                num: int = 8, out: str | Path | None = None) -> list[Path]:
    """``backmix_grid.png`` (the checkpoint's mask bank) and ``score_hist_<set>.png`` of one train run."""
    from ..engine.checkpoint import LAST
    from ..report.figures import PLOTS, bank_grid, score_plots

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / PLOTS
    cfg = cfg if cfg is not None else load_run_config(run_dir)
    written: list[Path] = []
    ckpt = Path(checkpoint) if checkpoint else run_dir / LAST
    if cfg is not None and ckpt.is_file():
        s = grid_samples(cfg, ckpt, num)
        if s is not None:
            written.append(bank_grid(out / "backmix_grid.png", s, cfg.data.mean, cfg.data.std))
    return written + score_plots(run_dir, out)
