"""Any image classifier as ``ModelOutput(logits, features)``: timm, torchvision, a run, your module.

The OOD scores read two things from a model: its **logits** and its **penultimate features**
(the input of the final linear layer).  :class:`FeatureClassifier` gets both from any
``nn.Module`` without changing it:

* **logits**: what ``net(images)`` returns — a ``(B, K)`` tensor, a :class:`ModelOutput`, a
  ``(logits, features)`` tuple or a dict with ``"logits"`` (and optionally ``"features"``).
* **features**: returned by the model (ModelOutput / tuple / dict), else captured with a
  forward hook: the **input** of ``head_layer`` (default: the final linear layer found by
  :func:`~backmix_vlm.models.heads.find_head_layer` — timm's ``get_classifier()``, a CAM head's
  1x1 conv, else the last ``nn.Linear``), or the **output** of ``feature_layer`` when that is
  given.  Captured ``(B, C, H, W)`` maps are global-average-pooled (a CAM head: GAP then a 1x1
  conv = the conv then GAP); token tensors ``(B, T, D)`` are refused with a hint.
* A model **without a classifier head** (timm ``num_classes=0``, an ``nn.Identity`` fc) returns
  its features; then ``logits`` is None and the OOD job fits a linear probe on them.

:func:`load_classifier` builds one from a source name (``timm`` / ``torchvision`` /
``module``) and says which input size and normalisation the model expects.  A ``backmix-vlm
train`` run as a classifier (the ood job's ``model.source: run``) is read above the engine that
wrote its checkpoint: :func:`backmix_vlm.jobs.ood.load_run_classifier`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from ..validation import check_choice
from .heads import find_head_layer, linear_head_of
from .output import ModelOutput

SOURCES = ("timm", "torchvision", "module")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pool(t: Tensor, where: str) -> Tensor:
    if t.dim() == 4:
        return t.mean(dim=(2, 3))
    if t.dim() == 2:
        return t
    if t.dim() > 2 and all(s == 1 for s in t.shape[2:]):
        return t.flatten(1)
    raise ModelError(f"{where} gives a {tuple(t.shape)} tensor; features must be (B, D) or a (B, C, H, W) map. "
                     f"For a transformer pick the layer after pooling (e.g. timm's 'fc_norm' or 'head_drop', "
                     f"or the classifier's input through model.head_layer)")


class FeatureClassifier(nn.Module):
    """Wrap ``net`` so that ``forward`` returns ``ModelOutput(logits, features)`` (see module doc).

    ``linear_head()`` is the final layer as a :class:`~backmix_vlm.models.heads.LinearHead`
    (None for a headless model), for ViM / ReAct / ASH.
    """

    def __init__(self, net: nn.Module, *, head_layer: str | None = None, feature_layer: str | None = None) -> None:
        super().__init__()
        self.net = net
        found = find_head_layer(net, head_layer)
        self.head_name, head = (found if found is not None else (None, None))
        self.feature_layer = feature_layer
        self._captured: Tensor | None = None
        modules = dict(net.named_modules())
        if feature_layer is not None:
            if feature_layer not in modules:
                raise ConfigError(f"model.feature_layer: no layer named '{feature_layer}' in {type(net).__name__} "
                                  f"(names from model.named_modules())")
            modules[feature_layer].register_forward_hook(self._keep_output)
        elif head is not None:
            head.register_forward_pre_hook(self._keep_input)

    def _keep_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, (tuple, list)) else output

    def _keep_input(self, module: nn.Module, args: Any) -> None:
        self._captured = args[0]

    def linear_head(self) -> Any:
        if self.head_name is None:
            return None
        return linear_head_of(self.net, dict(self.net.named_modules())[self.head_name], self.head_name)

    def linear_head_layer(self) -> nn.Module | None:
        return None if self.head_name is None else dict(self.net.named_modules())[self.head_name]

    def forward(self, images: Tensor) -> ModelOutput:
        self._captured = None
        out = self.net(images)
        logits: Tensor | None
        features: Tensor | None = None
        if isinstance(out, ModelOutput):
            logits, features = out.logits, out.features
        elif isinstance(out, Mapping):
            if "logits" not in out:
                raise ModelError(f"{type(self.net).__name__} returned a dict without 'logits' (keys: {', '.join(out)})")
            logits, features = out["logits"], out.get("features")
        elif isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise ModelError(f"{type(self.net).__name__} returned a {len(out)}-tuple; expected (logits, features)")
            logits, features = out
        elif isinstance(out, Tensor):
            logits = out
        else:
            raise ModelError(f"{type(self.net).__name__} returned {type(out).__name__}; expected logits (a tensor), "
                             f"a ModelOutput, (logits, features) or a dict with 'logits'")
        if self.feature_layer is not None or (features is None and self._captured is not None):
            if self._captured is None:
                raise ModelError(f"model.feature_layer '{self.feature_layer}' did not run in the forward pass")
            features = _pool(self._captured, f"layer '{self.feature_layer or self.head_name}'")
        if self.head_name is None and features is None:  # headless: the output is the features
            features, logits = _pool(logits, f"{type(self.net).__name__}'s output"), None
        self._captured = None
        return ModelOutput(logits=logits, features=features)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- loading
@dataclass
class LoadedClassifier:
    """A wrapped model plus what its inputs must look like and what identifies its weights."""

    model: FeatureClassifier
    image_size: int
    mean: list[float]
    std: list[float]
    identity: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    classes: list[str] | None = None


def load_classifier(source: str, name: str, *, pretrained: bool = False, checkpoint: str | None = None,
                    options: Mapping[str, Any] | None = None, image_size: int | None = None,
                    head_layer: str | None = None, feature_layer: str | None = None) -> LoadedClassifier:
    """Build the classifier ``name`` from ``source`` (timm | torchvision | module), in eval mode.

    * ``timm``: ``timm.create_model(name, **options)``; ``checkpoint`` = a local weights file
      loaded through ``pretrained_cfg_overlay=dict(file=...)`` (the hub is never contacted),
      ``pretrained: true`` = timm's weights from the Hugging Face cache (or download when
      online).  Input size / mean / std from the model's ``pretrained_cfg``.
    * ``torchvision``: ``torchvision.models.get_model(name, **options)``; ``checkpoint`` = a
      state-dict file, ``pretrained: true`` = its DEFAULT weights (torch-hub cache / download).
    * ``module``: ``"package.module:attr"``, an ``nn.Module`` or a callable returning one
      (called with ``options``); ``checkpoint`` = an optional state dict loaded strictly.
    """
    _check_source(source, name)
    options = dict(options or {})
    if source == "timm":
        net, size, mean, std = _load_timm(name, pretrained, checkpoint, options, image_size)
    elif source == "torchvision":
        net, size, mean, std = _load_torchvision(name, pretrained, checkpoint, options, image_size)
    else:
        net, size, mean, std = _load_module(name, checkpoint, options, image_size)
    net.eval()
    model = FeatureClassifier(net, head_layer=head_layer, feature_layer=feature_layer).eval()
    head = model.linear_head()
    ident = {"source": source, "name": name, "pretrained": pretrained, "checkpoint": checkpoint,
             "options": options, "image_size": size, "head_layer": model.head_name, "feature_layer": feature_layer}
    return LoadedClassifier(model, size, list(mean), list(std), ident, head.num_classes if head else None)


def check_classifier(source: str, name: str, *, pretrained: bool = False, checkpoint: str | None = None,
                     options: Mapping[str, Any] | None = None) -> None:
    """What :func:`load_classifier` would refuse, checked without building the model: the source,
    the name (a timm / torchvision model, an importable ``package.module:attr``) and the weights
    file."""
    _check_source(source, name)
    if source == "timm":
        _check_timm_name(name)
    elif source == "torchvision":
        _check_torchvision_name(name)
        if pretrained and checkpoint:
            raise ConfigError("model: give either pretrained: true (torchvision's weights) or checkpoint: FILE, not both")
    else:
        _resolve_module(name)
    if checkpoint and not Path(checkpoint).is_file():
        raise ModelError(f"model.checkpoint: weights file not found: {checkpoint}")


def _check_source(source: str, name: str) -> None:
    check_choice(source, SOURCES, "model.source")
    if not name:
        raise ConfigError(f"model.name: give the {source} model ({_NAME_HELP[source]})")


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name.split(".")[0]):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ModelError(f"unknown timm model '{name}'{'; similar: ' + ', '.join(close) if close else ''} "
                         f"(all: timm.list_models())")


def _check_torchvision_name(name: str) -> None:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
        raise ModelError(f"unknown torchvision model '{name}'{'; similar: ' + ', '.join(close) if close else ''} "
                         f"(all: torchvision.models.list_models())")


_NAME_HELP = {
    "timm": "a timm model name, e.g. resnet18 or vit_small_patch14_dinov2",
    "torchvision": "a torchvision.models name, e.g. resnet18",
    "module": "'package.module:attr' naming an nn.Module or a function returning one",
}


def _load_timm(name: str, pretrained: bool, checkpoint: str | None, options: dict[str, Any],
               image_size: int | None) -> tuple[nn.Module, int, Any, Any]:
    from .vit import load_timm_vit

    _check_timm_name(name)
    weights: Any = checkpoint if checkpoint else bool(pretrained)
    num_classes = options.pop("num_classes", None)  # None: the architecture's own head (timm drops None kwargs)
    try:  # ViTs take img_size (position embeddings); CNNs take any size and refuse the keyword
        net = load_timm_vit(name, pretrained=weights, img_size=image_size, num_classes=num_classes, **options)
    except ModelError as e:  # name this job's key for a local weights file
        raise ModelError(str(e).replace("model.pretrained=/path/to/model.safetensors",
                                        "model.checkpoint=/path/to/model.safetensors")) from None
    except TypeError as e:
        if "img_size" not in str(e) or image_size is None:
            raise ConfigError(f"model.options for timm '{name}': {e}") from None
        net = load_timm_vit(name, pretrained=weights, img_size=None, num_classes=num_classes, **options)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    size = int(image_size or (cfg.get("input_size") or (3, 224, 224))[-1])
    return net, size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)


def _load_torchvision(name: str, pretrained: bool, checkpoint: str | None, options: dict[str, Any],
                      image_size: int | None) -> tuple[nn.Module, int, Any, Any]:
    import torchvision

    _check_torchvision_name(name)
    if pretrained and checkpoint:
        raise ConfigError("model: give either pretrained: true (torchvision's weights) or checkpoint: FILE, not both")
    weights = None
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        url = weights.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if not cached.is_file():
            from ..runtime import hub_reachable

            if not hub_reachable():
                raise ModelError(f"torchvision '{name}' weights are not in the torch-hub cache ({cached}) and the "
                                 f"network is unreachable; download {url} elsewhere and pass model.checkpoint=FILE")
    try:
        net = torchvision.models.get_model(name, weights=weights, **options)
    except TypeError as e:
        raise ConfigError(f"model.options for torchvision '{name}': {e}") from None
    if checkpoint:
        _load_state(net, checkpoint, f"torchvision '{name}'")
    return net, int(image_size or 224), IMAGENET_MEAN, IMAGENET_STD


def _load_module(spec: str, checkpoint: str | None, options: dict[str, Any],
                 image_size: int | None) -> tuple[nn.Module, int, Any, Any]:
    return _load_module_object(_resolve_module(spec), spec, checkpoint, options, image_size)


def _resolve_module(spec: str) -> Any:
    """The object ``'package.module:attr'`` names (imported)."""
    if ":" not in spec:
        raise ConfigError(f"model.name {spec!r}: a module source is 'package.module:attr'")
    mod_name, attr = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"model.name {spec!r}: cannot import '{mod_name}' ({e}); is it on PYTHONPATH?") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.name {spec!r}: '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def _load_module_object(obj: Any, spec: str, checkpoint: str | None, options: dict[str, Any],
                        image_size: int | None) -> tuple[nn.Module, int, Any, Any]:
    if isinstance(obj, nn.Module):
        if options:
            raise ConfigError(f"model.options: {spec} is a module instance, not a function; remove the options")
        net = obj
    elif callable(obj):
        net = obj(**options)
        if not isinstance(net, nn.Module):
            raise ConfigError(f"model.name {spec!r}: calling it returned {type(net).__name__}, not an nn.Module")
    else:
        raise ConfigError(f"model.name {spec!r} is a {type(obj).__name__}; expected an nn.Module or a function")
    if checkpoint:
        _load_state(net, checkpoint, spec)
    return net, int(image_size or 224), IMAGENET_MEAN, IMAGENET_STD


def _load_state(net: nn.Module, path: str, what: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{what}: weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"{what}: {p} does not fit the model (missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]})")
