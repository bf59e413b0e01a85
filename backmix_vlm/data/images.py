"""Decoding helpers: any PIL image → 8-bit RGB, JPEG round trips, source-level crops.

Mode conversion rules (why: models expect 3 channels of 8-bit intensities, and PIL's
plain ``convert("RGB")`` is wrong for two common cases):

* transparency (RGBA, LA, PA, palette with a transparent index) is **composited on white**,
  what a viewer shows; dropping alpha would expose arbitrary colours hidden under it;
* 16/32-bit grayscale (``I;16*``, ``I``) is **rescaled** from 0..65535 to 0..255; PIL's own
  conversion clips, which turns most 16-bit images white;
* float (``F``) is clipped to 0..255 (or scaled ×255 when all values lie in 0..1);
* everything else (L, 1, P, CMYK, YCbCr, LAB, HSV) uses PIL's conversion.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """Return an 8-bit RGB version of ``img`` (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    """Encode as JPEG at ``quality`` in memory and decode again (matches JPEG-stored ID data)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB")


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Center crop to ``size`` x ``size`` (no-op when the image is not larger)."""
    w, h = img.size
    if w <= size and h <= size:
        return img
    cw, ch = min(size, w), min(size, h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))
