"""Class activation maps -> soft foreground maps for the mask bank (BackMix, Sec. IV-A).

A Conv1x1-GAP head (see :class:`backmix_vlm.models.cnn.CamHead`) gives per-class maps
``cam`` (B, K, h, w) whose spatial mean is the logits.  The foreground estimate of an image
is the ground-truth channel after a pixel-wise softmax over classes, so every value lies in
[0, 1] whatever the logit scale: this is what ``MaskBank.update`` stores.
"""
from __future__ import annotations

import torch
from torch import Tensor


def cam_foreground(cam_logits: Tensor, labels: Tensor) -> Tensor:
    """(B, h, w) maps in [0, 1]: softmax over the K classes at each cell, label channel kept."""
    if cam_logits.ndim != 4:
        raise ValueError(f"cam_foreground expects CAM logits (B, K, h, w), got {tuple(cam_logits.shape)}")
    b, _, h, w = cam_logits.shape
    labels = labels.to(cam_logits.device, torch.long).reshape(b, 1, 1, 1).expand(b, 1, h, w)
    probs = cam_logits.float().softmax(dim=1)
    return probs.gather(1, labels)[:, 0]
