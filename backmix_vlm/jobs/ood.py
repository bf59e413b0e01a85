"""``ood`` job: its config (any pretrained classifier, the ID test / training sets, OOD sets,
scores, the linear probe), loader, preflight and model loading.

``model.source`` is one of :func:`model_sources`: the sources of
:func:`backmix_vlm.models.classifier.load_classifier` (timm, torchvision, module) plus ``run``,
a ``backmix-vlm train`` run directory (its ``config.yaml`` + ``last.pt``), loaded here by
:func:`load_run_classifier` since reading the engine's checkpoint is above the models layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import DataSource, EvalConfig, RunConfig, default_data_root, fill_data_roots, from_dict, torch_checks
from ..errors import ConfigError, ModelError
from ..validation import check_choice
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
        if not torch_checks():
            return
        from ..ood.open_set import build_scores

        # names from the score registry, parameters; scores fit on training features need `train:`
        offers = ("train", "head", "forward") if self.train is not None else ("head", "forward")
        build_scores(self.eval, None, offers=offers, job="this run (no `train:` ID training data given)")


def random_weights(m: OodModelConfig) -> bool:
    """True when a timm / torchvision model would run on its random initialisation: no
    ``model.pretrained`` and no ``model.checkpoint`` (a ``module`` or ``run`` brings its own weights)."""
    return m.source in ("timm", "torchvision") and not m.pretrained and not m.checkpoint


RANDOM_WEIGHTS_WARNING = (
    "WARNING: {name} runs on RANDOM weights (model.pretrained: false and no model.checkpoint): its accuracy "
    "and OOD numbers mean nothing. For real results give model.checkpoint=/path/to/weights or "
    "model.pretrained=true")


def build_ood_config(data: dict[str, Any]) -> OodConfig:
    return from_dict(OodConfig, data)


def preflight(cfg: OodConfig) -> None:
    """Check the model source / name / weights file, the scores and every data source before a run
    folder is created or a model is loaded."""
    from ..data import check_dataset
    from ..models.classifier import check_classifier

    m = cfg.model
    if _check_model_source(m):
        check_run_classifier(Path(m.name))
    else:
        check_classifier(m.source, m.name, pretrained=m.pretrained, checkpoint=m.checkpoint, options=m.options)
    check_dataset(cfg.data, "data")
    if cfg.train is not None:
        check_dataset(cfg.train, "train")
    for i, src in enumerate(cfg.eval.ood):
        check_dataset(src, f"eval.ood[{i}] ({src.display_name})")


def load_model(cfg: OodConfig) -> Any:
    """The configured classifier (:func:`backmix_vlm.models.classifier.load_classifier`, or
    :func:`load_run_classifier` for ``model.source: run``) with the config's normalisation, if given."""
    from ..models.classifier import load_classifier

    m = cfg.model
    if _check_model_source(m):
        loaded = load_run_classifier(Path(m.name), head_layer=m.head_layer, feature_layer=m.feature_layer)
    else:
        loaded = load_classifier(m.source, m.name, pretrained=m.pretrained, checkpoint=m.checkpoint,
                                 options=m.options, image_size=m.image_size, head_layer=m.head_layer,
                                 feature_layer=m.feature_layer)
    if m.image_size is not None and m.source == "run" and m.image_size != loaded.image_size:
        raise ConfigError(f"model.image_size: the run was trained at {loaded.image_size} px; remove the key")
    if (m.mean is None) != (m.std is None):
        raise ConfigError("model.mean / model.std: give both or neither")
    if m.mean is not None:
        loaded.mean, loaded.std = list(m.mean), list(m.std)  # type: ignore[arg-type]
    return loaded


# ----------------------------------------------------------------------------- model.source=run
def model_sources() -> tuple[str, ...]:
    """``load_classifier``'s sources + ``run`` (a train run directory); imported here, not at the
    top, so the config (and a typo in it) is checked without torch."""
    from ..models.classifier import SOURCES

    return (*SOURCES, "run")


def _check_model_source(m: OodModelConfig) -> bool:
    """Check ``model.source`` (and, for a run, that no weights keys are given); True for ``run``."""
    check_choice(m.source, model_sources(), "model.source")
    if m.source != "run":
        return False
    if not m.name:
        raise ConfigError("model.name: give the run model (a run directory written by backmix-vlm train)")
    if m.options or m.checkpoint or m.pretrained:
        raise ConfigError("model.options / checkpoint / pretrained do not apply to model.source=run "
                          "(the run's config.yaml and last.pt define the model)")
    return True


def load_run_classifier(run_dir: str | Path, *, head_layer: str | None = None,
                        feature_layer: str | None = None) -> Any:
    """A ``backmix-vlm train`` run's CNN (its ``config.yaml`` + ``last.pt``) as a
    :class:`~backmix_vlm.models.classifier.LoadedClassifier`, in eval mode."""
    from ..engine.checkpoint import LAST, load_checkpoint, load_model_state_dict
    from ..models.classifier import FeatureClassifier, LoadedClassifier
    from ..models.cnn import create_cnn

    run_dir = Path(run_dir)
    check_run_classifier(run_dir)
    cfg = _run_model_config(run_dir)
    state = load_checkpoint(run_dir / LAST)
    classes = state.get("meta", {}).get("classes")
    from ..engine.methods import build_method

    net = create_cnn(cfg["name"], len(classes) if classes else _num_classes(state), **cfg["options"])
    build_method(cfg["method"], cfg["method_options"]).attach(net, net.num_classes)  # its heads (training methods)
    load_model_state_dict(net, state["model"], trainable_only=state.get("trainable_only", False),
                          source=run_dir / LAST)
    net.eval()
    model = FeatureClassifier(net, head_layer=head_layer, feature_layer=feature_layer).eval()
    ident = {"source": "run", "run": str(run_dir.resolve()), "epoch": int(state.get("epoch", 0)),
             "model": cfg["name"]}
    return LoadedClassifier(model, cfg["image_size"], cfg["mean"], cfg["std"], ident,
                            net.num_classes, list(classes) if classes else None)


def check_run_classifier(run_dir: str | Path) -> None:
    """What :func:`load_run_classifier` refuses, checked without loading: no ``config.yaml``, a run
    of another job, no ``last.pt``."""
    from ..engine.checkpoint import LAST

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"model.name: {run_dir} has no config.yaml; give a run directory written by "
                          f"backmix-vlm train (for a comparison run, one variant's folder, e.g. {run_dir}/backmix)")
    info = run_dir / "run_info.json"
    if info.is_file() and json.loads(info.read_text()).get("job") not in (None, "train"):
        raise ConfigError(f"model.name: {run_dir} is a '{json.loads(info.read_text()).get('job')}' run; "
                          f"model.source=run takes train runs (re-evaluate few-shot runs with backmix-vlm eval)")
    if not (run_dir / LAST).is_file():
        raise ConfigError(f"model.name: {run_dir} has no {LAST} (a comparison run keeps one per variant folder)")


def _run_model_config(run_dir: Path) -> dict[str, Any]:
    """Model and input settings from a train run's resolved ``config.yaml``, read as data (a run
    written by an older version, whose config the current ``TrainConfig`` might refuse, still loads)."""
    from ..config import load_yaml

    path = run_dir / "config.yaml"
    saved = load_yaml(path)
    try:
        model, data = saved["model"], saved["data"]
        method = saved.get("method") or {}
        return {"name": str(model["name"]), "options": dict(model.get("options") or {}),
                "method": str(method.get("name", "plain")), "method_options": dict(method.get("options") or {}),
                "image_size": int(data["image_size"]), "mean": [float(v) for v in data["mean"]],
                "std": [float(v) for v in data["std"]]}
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model.name: {path} is not a train run's resolved config (missing or bad {e}); "
                          "give a run directory written by backmix-vlm train") from None


def _num_classes(state: Mapping[str, Any]) -> int:
    w = state["model"].get("head.conv.weight")
    if w is None:
        raise ModelError("run checkpoint: cannot tell the number of classes (no meta.classes, no head.conv.weight)")
    return int(w.shape[0])
