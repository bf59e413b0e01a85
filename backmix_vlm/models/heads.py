"""The final linear layer of a classifier, as data: ``logits = features @ weight.T + bias``.

ViM, ReAct and ASH re-run the last layer on modified penultimate features, so they need its
weight and bias.  :func:`find_linear_head` gets them from a model (timm ``get_classifier()``,
torchvision's last ``nn.Linear``, the CAM head's 1x1 convolution, a named layer),
:func:`fit_linear_probe` fits one on frozen features (a multinomial logistic regression),
and :func:`check_head` verifies that a head really maps the cached features to the cached
logits before any score trusts it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError


@dataclass
class LinearHead:
    """``weight`` (K, D) and ``bias`` (K,): the map from penultimate features to logits."""

    weight: Tensor
    bias: Tensor
    name: str = "head"

    def __post_init__(self) -> None:
        self.weight = self.weight.detach().float().cpu()
        self.bias = self.bias.detach().float().cpu().reshape(-1)
        if self.weight.dim() != 2 or self.bias.shape[0] != self.weight.shape[0]:
            raise ConfigError(f"linear head '{self.name}': weight {tuple(self.weight.shape)} and bias "
                              f"{tuple(self.bias.shape)} do not form a (K, D) / (K,) pair")

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, features: Tensor) -> Tensor:
        """Logits of ``features`` (N, D), computed in the features' dtype and device."""
        w = self.weight.to(features.device, features.dtype)
        return features @ w.T + self.bias.to(features.device, features.dtype)

    @classmethod
    def from_module(cls, module: nn.Module, name: str = "head") -> "LinearHead":
        """An ``nn.Linear`` or a 1x1 ``nn.Conv2d`` (a CAM head: GAP then the conv = the conv then GAP)."""
        if isinstance(module, nn.Linear):
            weight = module.weight
        elif isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1:
            weight = module.weight[:, :, 0, 0]
        else:
            raise ConfigError(f"layer '{name}' is a {type(module).__name__}; the final layer must be an nn.Linear "
                              f"or a 1x1 nn.Conv2d for scores that re-run it (vim, react, ash_*)")
        bias = module.bias if module.bias is not None else torch.zeros(weight.shape[0])
        return cls(weight, bias, name)


def module_name(model: nn.Module, target: nn.Module) -> str | None:
    """The dotted name of ``target`` inside ``model`` (None when it is not a submodule)."""
    for name, m in model.named_modules():
        if m is target:
            return name
    return None


def find_head_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module] | None:
    """(name, layer) of the classifier's final linear layer, or None when it has none.

    ``name`` picks a layer by its ``named_modules()`` name.  Otherwise, in order: a
    ``linear_head_layer()`` method, timm's ``get_classifier()`` (None when it is an
    Identity: a model built with ``num_classes=0``), a CAM head (``head.conv``), and the last
    ``nn.Linear`` registered in the model (torchvision's ``fc`` / ``classifier[-1]`` /
    ``heads.head``).  Callers check the choice with :func:`check_head`.
    """
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            close = [n for n in modules if n and (name in n or n.endswith(name.split(".")[-1]))][:8]
            raise ConfigError(f"model.head_layer: no layer named '{name}' in {type(model).__name__}"
                              f"{'; similar: ' + ', '.join(close) if close else ''} (names from model.named_modules())")
        return name, modules[name]
    getter = getattr(model, "linear_head_layer", None)
    if callable(getter):
        layer = getter()
        return (module_name(model, layer) or "head", layer) if layer is not None else None
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        layer = getter()
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            return module_name(model, layer) or "classifier", layer
        if layer is None or isinstance(layer, nn.Identity):
            return None
    conv = getattr(getattr(model, "head", None), "conv", None)
    if isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1):
        return module_name(model, conv) or "head.conv", conv
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (n, m)
    return last


def find_linear_head(model: nn.Module, name: str | None = None) -> LinearHead | None:
    """The :class:`LinearHead` of ``model`` (see :func:`find_head_layer`), or None."""
    found = find_head_layer(model, name)
    return None if found is None else linear_head_of(model, found[1], found[0])


def linear_head_of(model: nn.Module, layer: nn.Module, name: str) -> LinearHead:
    """``layer`` as a :class:`LinearHead`, with the fixed output scale of a CAM head that owns it
    (``CamHead(scale=...)``, e.g. airbench's 1/9) folded into its weights and bias."""
    head = LinearHead.from_module(layer, name)
    for m in model.modules():
        if getattr(m, "conv", None) is layer and float(getattr(m, "scale", 1.0)) != 1.0:
            return LinearHead(head.weight * m.scale, head.bias * m.scale, head.name)
    return head


def check_head(head: LinearHead, outputs: Mapping[str, Tensor], *, where: str = "known",
               rtol: float = 1e-3) -> None:
    """Fail unless ``head(features)`` reproduces the cached ``logits`` (up to ``rtol`` of their scale).

    Use :func:`head_tolerance` for outputs computed under bf16 / fp16 autocast.

    A head that does not map the cached features to the logits (features taken after a
    layer that follows, logits from another branch) would make ViM / ReAct / ASH silently
    score something else.
    """
    feats, logits = outputs.get("features"), outputs.get("logits")
    if feats is None or logits is None:
        return
    if feats.shape[-1] != head.in_features or logits.shape[-1] != head.num_classes:
        raise ConfigError(f"linear head '{head.name}' is {head.num_classes} x {head.in_features}, but the model "
                          f"gives {feats.shape[-1]}-d features and {logits.shape[-1]} logits; set model.head_layer "
                          f"(or model.feature_layer) to the layer that maps the features to the logits")
    n = min(512, feats.shape[0])
    recomputed = head(feats[:n].double())
    err = (recomputed - logits[:n].double()).abs().max().item()
    scale = logits[:n].double().abs().max().item() + 1e-6
    if err > rtol * scale + 1e-4:
        raise ConfigError(
            f"linear head '{head.name}': features @ W.T + b differs from the model's logits by up to {err:.3g} "
            f"(logits up to {scale:.3g}) on '{where}'; the features are not the input of that layer. Set "
            f"model.head_layer to the model's final linear layer (its input is taken as the features)"
        )


def head_tolerance(precision: str) -> float:
    """``check_head``'s relative tolerance for outputs computed at ``precision`` (no | bf16 | fp16)."""
    return 1e-3 if precision == "no" else 5e-2


def fit_linear_probe(features: Tensor, labels: Tensor, *, C: float = 1.0, max_iter: int = 1000,
                     seed: int = 0) -> LinearHead:
    """Multinomial logistic regression (scikit-learn, L-BFGS, L2 strength ``1/C``) on frozen features.

    Features are standardised for the solver; the scaling is folded back into the weights,
    so the returned head applies to the raw features: ``logits = x @ W.T + b``.
    """
    from sklearn.linear_model import LogisticRegression

    x = features.double().cpu().numpy()
    y = labels.long().cpu().numpy()
    if len(set(y.tolist())) < 2:
        raise ConfigError("linear probe: the training features hold fewer than 2 classes")
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    clf.fit((x - mu) / sigma, y)
    w = torch.from_numpy(clf.coef_ / sigma)
    b = torch.from_numpy(clf.intercept_ - (clf.coef_ / sigma) @ mu)
    if w.shape[0] == 1:  # sklearn's binary case: one logit -> the two-class form
        w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
    classes = torch.from_numpy(clf.classes_).long()
    k = int(classes.max()) + 1
    if k != len(classes):  # labels with gaps: absent classes get -inf-like logits
        full_w, full_b = torch.zeros(k, w.shape[1], dtype=w.dtype), torch.full((k,), -1e4, dtype=b.dtype)
        full_w[classes], full_b[classes] = w, b
        w, b = full_w, full_b
    return LinearHead(w, b, name="linear_probe")


def head_info(head: LinearHead | None) -> dict[str, Any] | None:
    return None if head is None else {"name": head.name, "classes": head.num_classes, "in_features": head.in_features}
