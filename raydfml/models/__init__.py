"""Backbones by name.

``build_model(arch, ...)`` is the one constructor. The same definition serves two roles:

- teacher: ``track_bn_stats=True`` (ordinary module with BN running statistics, which inversion
  needs as its BN-statistics prior);
- meta-model: ``track_bn_stats=False`` so BN always normalises with the current batch (the seeds'
  transductive BN), and no buffers change under ``torch.func.functional_call``.
"""
from __future__ import annotations

from torch import nn

from .conv4 import Conv4
from .registry import BACKBONES, backbone_names, register_backbone
from .resample import NativeResolution, resize
from .generator import Generator
from .resnet import ResNet, resnet10, resnet18, resnet50

ARCHS = ("conv4", "resnet10", "resnet18", "resnet50")     # the package's own backbones (more by registration)


def build_model(arch: str, num_classes: int = 5, image_size: int = 32, width: float = 1.0,
                track_bn_stats: bool = True, adaptive_pool: bool = False) -> nn.Module:
    """The backbone registered as ``arch`` (an unknown name is a one-line ``UserError``)."""
    builder = BACKBONES.get(arch, option="architecture")
    return builder(num_classes=num_classes, image_size=image_size, width=width, track_bn_stats=track_bn_stats,
                   adaptive_pool=adaptive_pool)


__all__ = ["ARCHS", "BACKBONES", "backbone_names", "register_backbone", "build_model", "NativeResolution", "resize", "Conv4", "ResNet", "Generator", "resnet10",
           "resnet18", "resnet50"]
