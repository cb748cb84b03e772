"""Backbones by name.

``build_model(arch, ...)`` is the one constructor. The same definition serves two roles:

- teacher: ``track_bn_stats=True`` (ordinary module with BN running statistics, which inversion
  needs as its BN-statistics prior);
- meta-model: ``track_bn_stats=False`` so BN always normalises with the current batch (the seeds'
  transductive BN), and no buffers change under ``torch.func.functional_call``.
"""
from __future__ import annotations

from torch import nn

from ..errors import UserError
from .conv4 import Conv4
from .resample import NativeResolution, resize
from .generator import Generator
from .resnet import ResNet, resnet10, resnet18, resnet50

ARCHS = ("conv4", "resnet10", "resnet18", "resnet50")


def build_model(arch: str, num_classes: int = 5, image_size: int = 32, width: float = 1.0,
                track_bn_stats: bool = True, adaptive_pool: bool = False) -> nn.Module:
    if arch == "conv4":
        return Conv4(num_classes, image_size=image_size, width=width, adaptive_pool=adaptive_pool,
                     track_bn_stats=track_bn_stats)
    builders = {"resnet10": resnet10, "resnet18": resnet18, "resnet50": resnet50}
    if arch not in builders:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return builders[arch](num_classes=num_classes, width=width, track_bn_stats=track_bn_stats)


__all__ = ["ARCHS", "build_model", "NativeResolution", "resize", "Conv4", "ResNet", "Generator", "resnet10",
           "resnet18", "resnet50"]
