"""CNN classifiers with a CAM head: backbone -> Conv1x1 -> GAP (BackMix, Sec. IV-A).

The paper swaps GAP -> Linear for Conv1x1 -> GAP: the same function (the spatial mean
commutes with a 1x1 convolution), but the 1x1 convolution's output IS the class activation
map, so the CAMs that feed the mask bank come free with every forward pass.

Every model returns ``ModelOutput(logits, features, cam)``:
  logits   (B, K)        GAP of the CAM,
  features (B, D)        GAP of the backbone's last feature map,
  cam      (B, K, h, w)  the 1x1 conv output, pre-softmax.
``model.cam_size(image_size)`` gives (h, w), the resolution to build the mask bank at.

Backbones (registry ``CNN_MODELS``):
  resnet18_cifar  timm's ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool);
                  stride 8: 4x4 maps at 32 px.
  wrn40_4         WideResNet-40-4 (Zagoruyko & Komodakis), the paper's CIFAR backbone; timm
                  has no CIFAR WRN, so it is written here; stride 4: 8x8 maps at 32 px.
  small_cnn       four 3x3 conv layers, fast on CPU for demos and tests; stride 4: 8x8 at 32 px.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import timm
from torch import Tensor, nn

from ..errors import ModelError
from ..registry import Registry
from .output import ModelOutput

# name -> builder(**kw) returning (backbone: image -> feature map, num_features, stride)
CNN_MODELS: Registry[Callable[..., tuple[nn.Module, int, int]]] = Registry("cnn model")


class CamHead(nn.Module):
    """Conv1x1 -> GAP: logits are the spatial mean of the class activation maps."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, num_classes, kernel_size=1, bias=True)

    def forward(self, fmap: Tensor) -> tuple[Tensor, Tensor]:
        cam = self.conv(fmap)
        return cam.mean(dim=(2, 3)), cam


class CamClassifier(nn.Module):
    """A feature-map backbone + :class:`CamHead`, returning :class:`ModelOutput`."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, stride: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = CamHead(num_features, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes
        self.stride = stride

    def cam_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """CAM / mask-bank resolution for this input size (every downsampling rounds up)."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> ModelOutput:
        fmap = self.backbone(x)
        logits, cam = self.head(fmap)
        return ModelOutput(logits=logits, features=fmap.mean(dim=(2, 3)), cam=cam)


def check_cnn(name: str, options: dict | None = None) -> Callable[..., tuple[nn.Module, int, int]]:
    """The builder of a registered CNN; an unknown name or option is a ModelError listing the valid ones."""
    builder = CNN_MODELS.get(name)
    accepted = list(inspect.signature(builder).parameters)
    unknown = [k for k in (options or {}) if k not in accepted]
    if unknown:
        raise ModelError(f"model '{name}': unknown option(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(accepted) or 'none'}")
    return builder


def create_cnn(name: str, num_classes: int, **kw) -> CamClassifier:
    """Build a registered CNN (``CNN_MODELS``) with a CAM head for ``num_classes`` classes.

    ``kw`` goes to the backbone builder (e.g. ``drop_rate``, ``in_chans``); unknown options
    raise a ModelError listing the accepted ones.
    """
    builder = check_cnn(name, kw)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"model '{name}': num_classes={num_classes!r}; expected a positive integer")
    backbone, num_features, stride = builder(**kw)
    return CamClassifier(backbone, num_features, num_classes, stride)


# ----------------------------------------------------------------------------- ResNet-18 (timm)
class _TimmFeatureMap(nn.Module):
    """A timm model used as image -> last feature map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


@CNN_MODELS.register("resnet18_cifar")
def resnet18_cifar(in_chans: int = 3, drop_path_rate: float = 0.0) -> tuple[nn.Module, int, int]:
    """timm ResNet-18 with the usual CIFAR stem: 3x3 stride-1 conv, no max-pool (stride 8)."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="",
                              in_chans=in_chans, drop_path_rate=drop_path_rate)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return _TimmFeatureMap(model), model.num_features, 8


# ----------------------------------------------------------------------------- WideResNet
class _WideBlock(nn.Module):
    """Pre-activation wide basic block (BN-ReLU-conv x2), 1x1 shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if cin != cout or stride != 1 else None)

    def forward(self, x: Tensor) -> Tensor:
        o = self.act(self.bn1(x))
        y = self.conv2(self.drop(self.act(self.bn2(self.conv1(o)))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WideResNet-depth-widen for 32 px inputs; forward returns the (B, 64*widen, H/4, W/4) map."""

    def __init__(self, depth: int = 40, widen: int = 4, drop_rate: float = 0.0, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ModelError(f"wrn: depth={depth} is not accepted; expected 6n + 4 (e.g. 16, 28, 40)")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                layers.append(_WideBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1],
                                         stride if i == 0 else 1, drop_rate))
        self.blocks = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(widths[-1])
        self.act = nn.ReLU(inplace=True)
        self.num_features = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.blocks(self.stem(x))))


@CNN_MODELS.register("wrn40_4")
def wrn40_4(drop_rate: float = 0.0, in_chans: int = 3) -> tuple[nn.Module, int, int]:
    model = WideResNet(40, 4, drop_rate=drop_rate, in_chans=in_chans)
    return model, model.num_features, 4


# ----------------------------------------------------------------------------- small CNN
@CNN_MODELS.register("small_cnn")
def small_cnn(width: int = 32, in_chans: int = 3) -> tuple[nn.Module, int, int]:
    """Four 3x3 conv-BN-ReLU layers (widths w, 2w, 4w, 4w; two stride-2): a CPU-friendly demo net."""
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    widths = [width, 2 * width, 4 * width, 4 * width]
    layers = block(in_chans, widths[0], 1) + block(widths[0], widths[1], 2)
    layers += block(widths[1], widths[2], 2) + block(widths[2], widths[3], 1)
    return nn.Sequential(*layers), widths[-1], 4
