"""``ood`` job: its config (any pretrained classifier, the ID test / training sets, OOD sets,
scores, the linear probe), loader, preflight and model loading."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import DataSource, EvalConfig, RunConfig, default_data_root, fill_data_roots, from_dict
from ..errors import ConfigError
from .data import check_distinct_sets

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

    def validate(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ConfigError("model.mean / model.std: give both or neither")


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

    def validate(self) -> None:
        check_distinct_sets(self.data, self.eval.ood, reserved=("train",))


def build_ood_config(data: dict[str, Any]) -> OodConfig:
    return from_dict(OodConfig, data)


def preflight(cfg: OodConfig) -> None:
    """Check the model source / name / weights file, the scores and every data source before a run
    folder is created or a model is loaded."""
    from ..data import check_dataset
    from ..engine.evaluation import build_scores
    from ..models.classifier import check_classifier

    m = cfg.model
    check_classifier(m.source, m.name, pretrained=m.pretrained, checkpoint=m.checkpoint, options=m.options)
    build_scores(cfg.eval, None)  # unknown score names / score_params fail now
    check_dataset(cfg.data, "data")
    if cfg.train is not None:
        check_dataset(cfg.train, "train")
    for i, src in enumerate(cfg.eval.ood):
        check_dataset(src, f"eval.ood[{i}] ({src.display_name})")


def load_model(cfg: OodConfig) -> Any:
    """The configured classifier (:func:`backmix_vlm.models.classifier.load_classifier`) with the
    config's normalisation, if given."""
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
