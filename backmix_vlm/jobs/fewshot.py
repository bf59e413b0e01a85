"""``fewshot`` job: its config (an adapter over a frozen CLIP / timm ViT, k shots per class, seeds),
loader, preflight, backbone, datasets and few-shot split files.

Optimizer keys the config leaves out follow CoOp's ViT-B/16 recipe for the shot count
(:func:`backmix_vlm.adapters.coop.coop_default_schedule`): SGD lr 0.002, batch 32, cosine,
one warm-up epoch at 1e-5; 50 / 100 / 200 epochs for 1 / 2-4 / 8-16 shots.  ``method.name: lora``
follows CLIP-LoRA's instead (:func:`backmix_vlm.adapters.lora.lora_default_schedule`: AdamW lr 2e-4,
batch 32, cosine, 500 x shots iterations).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (AugmentConfig, BackMixConfig, DataSource, EvalConfig, OptimConfig, RunConfig, ViewsConfig,
                      build_with_overrides, default_data_root, fill_data_roots, from_dict, load_yaml,
                      move_data_root)
from ..engine.adapter_task import SaliencyConfig
from ..errors import ConfigError
from ..models.backbone import FAMILIES, FROZEN_WEIGHTS, Backbone, BackboneConfig
from ..runtime import on_main_process
from ..validation import check_choice
from .data import OpenSetData, build_open_set_data

JOB = "fewshot"
VISION_ONLY_METHODS = ("vpt", "lora")     # methods that need no text tower (timm backbones)
SHOT_CHOICES = (1, 2, 4, 8, 16)
__all__ = ["JOB", "FAMILIES", "FROZEN_WEIGHTS", "SHOT_CHOICES", "BackboneConfig", "MethodConfig",
           "FewShotDataConfig", "FewShotEvalConfig", "FewShotConfig", "load_fewshot_config", "build_fewshot_config",
           "preflight", "build_backbone", "adapter_config", "build_datasets", "split_file"]


@dataclass
class MethodConfig:
    name: str = "coop"                     # a registered adapter (adapters.ADAPTERS): coop | locoop | vpt | lora
    options: dict[str, Any] = field(default_factory=dict)  # the adapter's config: CoOpConfig / LoCoOpConfig / VPTConfig / LoRAConfig fields

    def validate(self) -> None:
        from ..adapters import ADAPTERS

        check_choice(self.name, ADAPTERS.names(), "method.name")


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
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # backmix (default) | cutout | mixup | cutmix | none
    backmix: BackMixConfig = field(default_factory=BackMixConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: FewShotEvalConfig = field(default_factory=FewShotEvalConfig)
    setting: str | None = None             # row label in combined tables (default: "<k>-shot" / "Full-data")

    def __post_init__(self) -> None:
        fill_data_roots(self, self.data_root)

    def validate(self) -> None:
        """The registered names of the sections (mixer and its options, views), once every key parsed."""
        from ..augment import build_mixer
        from ..augment.geometry import check_views

        build_mixer(self.augment, self.backmix)
        check_views(self.data.views)

    @property
    def setting_label(self) -> str:
        if self.setting:
            return self.setting
        k = self.data.shots_per_class
        return "Full-data" if k is None else f"{k}-shot"

    @property
    def method_label(self) -> str:
        from ..augment import MIXERS

        name = {"coop": "CoOp", "locoop": "LoCoOp", "vpt": "VPT", "lora": "LoRA"}.get(self.method.name, self.method.name)
        label = MIXERS.get(self.augment.active(self.backmix.enabled)).label
        return f"{name} + {label}" if label else name


def load_fewshot_config(path: str | Path | None, overrides: list[str] | None = None) -> FewShotConfig:
    """Load the YAML; optimizer keys it leaves out follow CoOp's recipe for its shot count
    (``method.name: lora``: CLIP-LoRA's, :func:`~backmix_vlm.adapters.lora.lora_default_schedule`).

    An error caused by a command-line override names that override.
    """
    data = move_data_root(load_yaml(path), list(overrides or [])) if path is not None else {}
    return build_with_overrides(build_fewshot_config, data, list(overrides or []), str(path) if path is not None else "")


def _check_method_fits_backbone(cfg: FewShotConfig) -> None:
    if cfg.backbone.family != "clip" and cfg.method.name not in VISION_ONLY_METHODS:
        raise ConfigError(f"method.name: {cfg.method.name} needs a CLIP text tower; use backbone.family=clip "
                          "(timm backbones support methods vpt and lora)")


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
    _check_method_fits_backbone(cfg)
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
    from ..models.backbone import check_backbone
    from ..ood.open_set import build_scores

    build_scores(cfg.eval, None)  # unknown score names / score_params fail now
    check_backbone(cfg.backbone)
    train = check_dataset(cfg.data.train, "data.train", known=True)
    known = check_dataset(cfg.data.test, "data.test", known=True)
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


# ----------------------------------------------------------------------------- what a run builds
def build_backbone(cfg: FewShotConfig, device: Any) -> Backbone:
    """The run's frozen backbone (:func:`backmix_vlm.models.backbone.create_backbone`), seeded with
    ``run.seed`` so random-init backbones are rebuilt identically by ``eval`` / ``visualize``."""
    from ..models.backbone import create_backbone

    _check_method_fits_backbone(cfg)
    return create_backbone(cfg.backbone, device=device, precision=cfg.run.precision, seed=cfg.run.seed)


def adapter_config(cfg: FewShotConfig) -> Any:
    """``method.options`` as the adapter's config dataclass (unknown keys fail by name)."""
    from ..adapters import ADAPTERS

    options = dict(cfg.method.options)
    if cfg.method.name in ("coop", "locoop") and "glmcm" in cfg.eval.scores:
        options.setdefault("local_features", True)  # GL-MCM reads per-patch cosines
    return from_dict(ADAPTERS.get(cfg.method.name).config_class, options, "method.options")


def build_adapter(cfg: FewShotConfig, backbone: Backbone, classes: list[str], device: Any) -> Any:
    """The run's adapter (``method``) over ``backbone`` on ``device``, its trainable parameters in fp32
    (weights, gradients and optimizer state): what ``fewshot`` trains and ``eval`` loads a checkpoint into."""
    from ..adapters import create_adapter
    from ..models.frozen import trainable_in_fp32

    adapter = create_adapter(cfg.method.name, backbone.base, classes, adapter_config(cfg))
    return trainable_in_fp32(adapter.to(device))


def build_datasets(cfg: FewShotConfig, backbone: Backbone) -> OpenSetData:
    """The full training set (few-shot subsets are drawn per seed), known test set, unknown and
    extra known sets, at the backbone's input size and normalisation."""
    from ..data import open_set_sources

    sources = open_set_sources(cfg.data.train, cfg.data.test, ood=cfg.eval.ood, protocol_key=None)
    return build_open_set_data(sources, image_size=backbone.image_size, mean=backbone.mean, std=backbone.std,
                               views=cfg.data.views, num_workers=cfg.data.num_workers,
                               extra_known=cfg.eval.extra_known)


def split_file(cfg: FewShotConfig, run_dir: Path, seed: int) -> Path | None:
    """Where seed ``seed``'s few-shot split is saved (shared by runs; None for full data)."""
    k = cfg.data.shots_per_class
    if k is None:
        return None
    folder = Path(cfg.data.split_dir) if cfg.data.split_dir else Path(cfg.run.output_dir) / "splits"
    classes = cfg.data.train.classes
    tag = "" if classes is None else "_classes" + "-".join(map(str, classes))
    return folder / f"{cfg.data.train.name}_{cfg.data.train.split}{tag}_{k}shot_seed{seed}.json"


def few_shot_subset(cfg: FewShotConfig, train_full: Any, seed: int, seed_dir: Path) -> tuple[Any, list[int] | None]:
    """Seed ``seed``'s k-shot subset of ``train_full`` (its split file read or written) and its indices;
    the full set and None with ``data.shots: full``."""
    from ..data import IndexedSubset, fewshot_indices

    k = cfg.data.shots_per_class
    if k is None:
        return train_full, None
    # the main process reads or writes the split file; every process trains on its indices
    indices = on_main_process(lambda: fewshot_indices(
        train_full.labels, k, seed, split_file(cfg, seed_dir, seed),
        dataset=f"{cfg.data.train.name}/{cfg.data.train.split}", class_names=train_full.classes))
    return IndexedSubset(train_full, indices), indices
