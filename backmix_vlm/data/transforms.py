"""Image transforms (PIL → normalised tensor), light enough to run in DataLoader workers."""
from __future__ import annotations

from typing import Callable, Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..errors import ConfigError
from ..validation import check_choice

# Per-channel statistics of the lossless CIFAR-10 training set.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# open_clip.constants.OPENAI_DATASET_MEAN / _STD (copied so importing data stays light).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# timm.data.IMAGENET_DEFAULT_MEAN / _STD.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZE_MODES = ("resize", "crop", "center_crop")
#: Side of the center crop taken by ``resize: crop`` (the classic 32 px "ImageNet/LSUN crop" OOD sets).
CROP_SIZE = 32
_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


def _to_size(image_size: int, resize: str, interp: InterpolationMode, crop_size: int) -> list[Callable]:
    """How an image of any size reaches ``image_size`` x ``image_size``."""
    if resize == "resize":          # squash the whole image to a square
        return [T.Resize((image_size, image_size), interpolation=interp)]
    if resize == "center_crop":     # CLIP style: shorter side to size, then center crop
        return [T.Resize(image_size, interpolation=interp), T.CenterCrop(image_size)]
    return [T.CenterCrop(crop_size), T.Resize((image_size, image_size), interpolation=interp)]  # crop


def build_transform(
    image_size: int,
    train: bool,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    resize: str = "resize",
    crop_padding: int | None = None,
    *,
    crop_size: int = CROP_SIZE,
    interpolation: str = "bicubic",
    rrc_scale: tuple[float, float] = (0.08, 1.0),
) -> Callable:
    """PIL RGB image → normalised ``FloatTensor[3, image_size, image_size]``.

    Eval: ``resize`` mode (``resize`` | ``center_crop`` | ``crop``, see :data:`RESIZE_MODES`)
    → ToTensor → Normalize.  Train adds augmentation: CIFAR-style RandomCrop with zero padding
    (``crop_padding``, default ``image_size // 8`` = 4 at 32 px) for sizes ≤ 64 px or when
    ``crop_padding`` is given, else RandomResizedCrop(``rrc_scale``) as in CoOp; then a
    horizontal flip.  ``mean``/``std`` ``None`` skips normalisation.
    """
    check_choice(resize, RESIZE_MODES, "resize")
    check_choice(interpolation, tuple(_INTERPOLATION), "interpolation")
    if int(image_size) <= 0:
        raise ConfigError(f"image_size: expected a positive integer, got {image_size!r}")
    if (mean is None) != (std is None):
        raise ConfigError("build_transform: give both mean and std, or neither")
    interp = _INTERPOLATION[interpolation]
    steps: list[Callable] = []
    if train and crop_padding is None and image_size > 64:
        steps.append(T.RandomResizedCrop(image_size, scale=rrc_scale, interpolation=interp))
    elif train:
        pad = image_size // 8 if crop_padding is None else int(crop_padding)
        steps += _to_size(image_size, resize, interp, crop_size)
        steps.append(T.RandomCrop(image_size, padding=pad if pad > 0 else None))
    else:
        steps += _to_size(image_size, resize, interp, crop_size)
    if train:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.ToTensor())
    if mean is not None:
        steps.append(T.Normalize(tuple(mean), tuple(std)))  # type: ignore[arg-type]
    return T.Compose(steps)
