"""Image normalisation, done on the device rather than in the loader.

Splits and episodes keep images as ``uint8`` (4x smaller than float32, cheap to share through Ray's
object store and to ship to a GPU); the float conversion and the per-channel
``(x/255 - mean)/std`` of the seeds' ``ToTensor`` + ``Normalize`` happen here, as late as possible.
The seeds use no augmentation, so this is the whole transform.
"""
from __future__ import annotations

import numpy as np
import torch

from .registry import DatasetSpec


def _stats(spec: DatasetSpec, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Shape [3, 1, 1] broadcasts over both a single [3, S, S] image and a [N, 3, S, S] batch.
    mean = torch.tensor(spec.mean, device=device, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(spec.std, device=device, dtype=dtype).view(3, 1, 1)
    return mean, std


def normalize(x_uint8: torch.Tensor | np.ndarray, spec: DatasetSpec, device=None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` images ``[..., 3, S, S]`` -> float ``(x/255 - mean) / std`` on ``device``.

    The uint8 tensor is moved first (a quarter of the bytes of a float copy), then converted.
    """
    x = torch.as_tensor(x_uint8)
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {x.dtype}")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"normalize expects [..., 3, H, W] images, got shape {tuple(x.shape)}")
    if device is not None:
        x = x.to(device, non_blocking=True)
    mean, std = _stats(spec, x.device, dtype)
    return (x.to(dtype) / 255.0 - mean) / std


def denormalize(x: torch.Tensor, spec: DatasetSpec, clamp: bool = True) -> torch.Tensor:
    """Inverse of :func:`normalize`: float images in [0, 1] (clamped unless ``clamp=False``).

    Used to save or inspect synthesized images, which live in normalised space.
    """
    mean, std = _stats(spec, x.device, x.dtype)
    out = x * std + mean
    return out.clamp(0.0, 1.0) if clamp else out


def to_uint8(x: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """Normalised float images -> ``uint8`` (e.g. to store synthesized images like real ones)."""
    return (denormalize(x, spec) * 255.0).round().to(torch.uint8)
