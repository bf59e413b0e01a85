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
import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..registry import Registry
from .output import ModelOutput

# name -> builder(**kw) returning (backbone: image -> feature map, num_features, stride)
CNN_MODELS: Registry[Callable[..., tuple[nn.Module, int, int]]] = Registry("cnn model")


HEAD_POOLS = ("avg", "max")


class CamHead(nn.Module):
    """Conv1x1 -> GAP: logits are the spatial mean of the class activation maps.

    ``scale`` multiplies the maps (airbench's fixed 1/9 output scale); ``bias`` as a linear layer's.
    ``pool="max"`` is airbench's head instead (global max-pool of the features, then the same
    1x1 weights as a linear layer): the logits are no longer the CAM's mean, but the CAM is
    still the 1x1 conv of the feature map with the classifier's weights, so BackMix keeps
    getting it from the training forward.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, scale: float = 1.0,
                 pool: str = "avg") -> None:
        super().__init__()
        if pool not in HEAD_POOLS:
            raise ModelError(f"model option head_pool={pool!r} is not accepted; choose {', '.join(HEAD_POOLS)}")
        self.conv = nn.Conv2d(in_features, num_classes, kernel_size=1, bias=bias)
        self.scale = float(scale)
        self.pool = pool

    def forward(self, fmap: Tensor) -> tuple[Tensor, Tensor]:
        cam = self.conv(fmap)
        if self.scale != 1.0:
            cam = cam * self.scale
        if self.pool == "avg":
            return cam.mean(dim=(2, 3)), cam
        return self.conv(self.pool_features(fmap)[..., None, None]).flatten(1) * self.scale, cam

    def pool_features(self, fmap: Tensor) -> Tensor:
        """The pooled feature vector the logits are a linear function of."""
        return fmap.mean(dim=(2, 3)) if self.pool == "avg" else fmap.amax(dim=(2, 3))


TTA_MODES = ("none", "flip", "flip_translate")


class CamClassifier(nn.Module):
    """A feature-map backbone + :class:`CamHead`, returning :class:`ModelOutput`.

    ``tta`` (evaluation only): ``flip`` averages the outputs of the image and its mirror;
    ``flip_translate`` also averages over 1 px shifts up-left and down-right (reflect-padded),
    weighted 1/2 : 1/4 : 1/4 as in airbench's level-2 test-time augmentation.  Training
    forwards and the CAM are never augmented.  ``head_pool``: see :class:`CamHead`.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, stride: int,
                 tta: str = "none", head_bias: bool = True, head_scale: float = 1.0,
                 head_pool: str = "avg") -> None:
        super().__init__()
        if tta not in TTA_MODES:
            raise ModelError(f"model option tta={tta!r} is not accepted; choose {', '.join(TTA_MODES)}")
        self.backbone = backbone
        self.head = CamHead(num_features, num_classes, bias=head_bias, scale=head_scale, pool=head_pool)
        self.num_features = num_features
        self.num_classes = num_classes
        self.stride = stride
        self.tta = tta

    def cam_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """CAM / mask-bank resolution for this input size (every downsampling rounds up)."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if hasattr(self.backbone, "cam_size"):  # backbones whose downsampling rounds down (max-pools)
            return self.backbone.cam_size((h, w))
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def _forward(self, x: Tensor) -> ModelOutput:
        fmap = self.backbone(x)
        logits, cam = self.head(fmap)
        return ModelOutput(logits=logits, features=self.head.pool_features(fmap), cam=cam)

    def forward(self, x: Tensor) -> ModelOutput:
        if self.training or self.tta == "none":
            return self._forward(x)
        out = self._forward(x)
        views = [x.flip(-1)]
        weights = [0.5, 0.5]
        if self.tta == "flip_translate":
            padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
            h, w = x.shape[-2:]
            for shifted in (padded[..., :h, :w], padded[..., 2:, 2:]):
                views += [shifted, shifted.flip(-1)]
            weights = [0.25, 0.25] + [0.125] * 4
        logits, features = weights[0] * out.logits, weights[0] * out.features
        for wgt, v in zip(weights[1:], views):
            o = self._forward(v)
            logits, features = logits + wgt * o.logits, features + wgt * o.features
        return ModelOutput(logits=logits, features=features, cam=out.cam)


def check_cnn(name: str, options: dict | None = None) -> Callable[..., tuple[nn.Module, int, int]]:
    """The builder of a registered CNN; an unknown name or option is a ModelError listing the valid ones
    (``tta`` and ``head_pool`` are the classifier's own options, see :class:`CamClassifier`)."""
    builder = CNN_MODELS.get(name)
    accepted = list(inspect.signature(builder).parameters) + list(CLASSIFIER_OPTIONS)
    unknown = [k for k in (options or {}) if k not in accepted]
    if unknown:
        raise ModelError(f"model '{name}': unknown option(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(accepted)}")
    return builder


CLASSIFIER_OPTIONS = ("tta", "head_pool")  # options of CamClassifier, not of the backbone builder


def create_cnn(name: str, num_classes: int, tta: str = "none", head_pool: str | None = None,
               **kw) -> CamClassifier:
    """Build a registered CNN (``CNN_MODELS``) with a CAM head for ``num_classes`` classes.

    ``kw`` goes to the backbone builder (e.g. ``drop_rate``, ``in_chans``); unknown options
    raise a ModelError listing the accepted ones.  ``tta``: see :class:`CamClassifier`.
    A backbone may carry ``head_options`` (``head_bias`` / ``head_scale`` of the CamHead);
    ``head_pool`` (``avg`` / ``max``) overrides the pooling, default ``avg`` (the paper's head).
    """
    builder = check_cnn(name, kw)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"model '{name}': num_classes={num_classes!r}; expected a positive integer")
    backbone, num_features, stride = builder(**kw)
    head = dict(getattr(backbone, "head_options", {}))
    if head_pool is not None:
        head["head_pool"] = head_pool
    return CamClassifier(backbone, num_features, num_classes, stride, tta=tta, **head)


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


# ----------------------------------------------------------------------------- airbench-class net
class _FastBatchNorm(nn.BatchNorm2d):
    """BatchNorm with the scale frozen at 1 (only the shift learns), eps 1e-12 and a fast running
    average (airbench: momentum 0.6 in its convention = 0.4 in PyTorch's)."""

    def __init__(self, num_features: int, momentum: float = 0.4) -> None:
        super().__init__(num_features, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)


def _dirac_conv(cin: int, cout: int, kernel: int = 3, padding: str | int = "same", bias: bool = False) -> nn.Conv2d:
    """3x3 conv initialised PyTorch's way plus an identity on the first ``min(cin, cout)`` filters
    (an implicit residual at initialisation)."""
    conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
        if bias:
            conv.bias.zero_()
    return conv


class _ConvGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU -> (conv -> BN -> GELU) x (depth - 1)."""

    def __init__(self, cin: int, cout: int, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_dirac_conv(cin, cout), nn.MaxPool2d(2), _FastBatchNorm(cout), nn.GELU()]
        for _ in range(depth - 1):
            layers += [_dirac_conv(cout, cout), _FastBatchNorm(cout), nn.GELU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class AirbenchNet(nn.Module):
    """A compact fast-training CIFAR net after Keller Jordan's airbench (speed-run recipe).

    A frozen 2x2 *whitening* convolution (initialised from the training images' patch
    covariance by :meth:`init_from_data`: its filters are the covariance's eigenvectors scaled
    by 1/sqrt(eigenvalue), with both signs), GELU, then three conv groups of ``widths`` with a
    max-pool each.  Departure from airbench: the whitening conv keeps the size ("same"
    padding), so 32 px inputs give a 4x4 CAM (airbench's 31 px gives 3x3), and the head is the
    toolkit's Conv1x1-GAP CAM head (airbench: max-pool 3 + linear), with airbench's 1/9 scale.
    """

    def __init__(self, widths: tuple[int, ...] = (64, 256, 256), depth: int = 2, in_chans: int = 3,
                 whiten_kernel: int = 2) -> None:
        super().__init__()
        whiten_width = 2 * in_chans * whiten_kernel ** 2
        self.whiten = nn.Conv2d(in_chans, whiten_width, whiten_kernel, padding=0, bias=True)
        self.whiten_pad = (0, whiten_kernel - 1, 0, whiten_kernel - 1)  # "same" size: pad right / bottom
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        groups, cin = [], whiten_width
        for w in widths:
            groups.append(_ConvGroup(cin, w, depth))
            cin = w
        self.groups = nn.Sequential(*groups)
        self.act = nn.GELU()
        self.num_features = cin
        self.head_options = {"head_bias": False, "head_scale": 1 / 9}

    def cam_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The map size for an input size: each max-pool halves it, rounding down."""
        f = 2 ** len(self.groups)
        return size[0] // f, size[1] // f

    @torch.no_grad()
    def init_from_data(self, images: Tensor, eps: float = 5e-4) -> None:
        """Whitening filters from (normalised) training images (B, C, H, W); airbench uses 5,000."""
        k = self.whiten.kernel_size
        c = images.shape[1]
        patches = images.float().unfold(2, k[0], 1).unfold(3, k[1], 1)          # B, C, H', W', kh, kw
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k[0] * k[1])
        cov = patches.T @ patches / patches.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, *k).flip(0)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.groups(self.act(self.whiten(torch.nn.functional.pad(x, self.whiten_pad))))


@CNN_MODELS.register("airbench")
def airbench(widths: tuple[int, ...] | list[int] = (64, 256, 256), depth: int = 2,
             in_chans: int = 3) -> tuple[nn.Module, int, int]:
    """airbench94-class net (~0.7 GFLOP / 32 px image at the default widths); stride 8."""
    model = AirbenchNet(tuple(int(w) for w in widths), int(depth), in_chans)
    return model, model.num_features, 2 ** len(model.groups)


@CNN_MODELS.register("airbench_wide")
def airbench_wide(widths: tuple[int, ...] | list[int] = (128, 384, 384), depth: int = 2,
                  in_chans: int = 3) -> tuple[nn.Module, int, int]:
    """The larger variant (airbench95's widths, ~1.9 GFLOP / image for forward + backward)."""
    return airbench(widths, depth, in_chans)
