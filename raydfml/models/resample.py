"""Feeding a network images of another resolution than it was trained at.

Scenario md on real data mixes CIFAR-FS teachers (32 px) with miniImageNet and CUB teachers (84 px),
while the synthesizers, the task memory bank and the meta-model work at one resolution (the
largest). FREE/TGR's code cropped a random 32-px patch out of the 84-px image for CIFAR teachers and
then banked the whole 84-px image under the CIFAR label (bug B16): the label described a patch. Here
the teacher sees the *whole* image, resized to the size it was trained at, so the banked image is
the one the teacher labelled. Resizing is differentiable, so inversion works through it.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of ``[N, C, H, W]`` to ``size``x``size``; antialiased when shrinking (like PIL's
    bilinear resize of the loader), a no-op at the same size. Commutes with per-channel normalisation."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1])


class NativeResolution(nn.Module):
    """``net`` behind a resize of its input to ``size`` (the resolution ``net`` was trained at).

    The wrapped network stays a child module, so BN-statistics hooks and ``eval()`` reach it."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net, self.size = net, int(size)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(resize(x, self.size))

    def extra_repr(self) -> str:
        return f"size={self.size}"
