"""backmix_vlm: BackMix augmentation and open-set / OOD evaluation for CNNs, ViTs and CLIP."""
__version__ = "0.1.0"
