"""Backbones by name (timm's ``@register_model``): ``@register_backbone("name")`` on a builder.

A builder takes ``(num_classes, image_size, width, track_bn_stats, adaptive_pool)`` as keywords
(ignoring what it does not use) and returns an ``nn.Module`` mapping images ``[B, 3, S, S]`` to
logits ``[B, num_classes]`` with the BatchNorm convention of ``build_model``. Registered backbones
serve as teachers (``pool.archs``) and as the meta-model (``learner.arch``); one defined in the user's
module reaches Ray workers with the config (``raydfml.plugins``; ``launch.py --plugin my_pkg.models``).
"""
from __future__ import annotations

from ..registry import Registry

BACKBONES = Registry("backbone")


def register_backbone(name: str):
    """Decorator: register a backbone builder under ``name``."""
    return BACKBONES.register(name)


def backbone_names() -> list[str]:
    return BACKBONES.names()


__all__ = ["BACKBONES", "backbone_names", "register_backbone"]
