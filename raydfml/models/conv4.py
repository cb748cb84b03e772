"""Conv4, the four-block CNN of the DFML seeds (CloserLookFewShot style, 32 channels).

Block = Conv3x3(pad 1, bias) -> BN -> ReLU -> MaxPool2. Head = flatten -> Linear, giving
32*(s/16)^2 features (128 at 32 px, 800 at 84 px); with ``adaptive_pool=True`` an
AdaptiveMaxPool(1) makes the head input-size agnostic (32 features), as FREE/BiDf-MKD use for
mixed 32/84 px pools.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .registry import register_backbone


class Conv4(nn.Module):
    def __init__(self, num_classes: int = 5, image_size: int = 32, width: float = 1.0,
                 adaptive_pool: bool = False, track_bn_stats: bool = True):
        super().__init__()
        channels = max(1, int(round(32 * width)))
        layers: list[nn.Module] = []
        in_ch = 3
        for _ in range(4):
            layers += [nn.Conv2d(in_ch, channels, 3, padding=1, bias=True),
                       nn.BatchNorm2d(channels, track_running_stats=track_bn_stats),
                       nn.ReLU(inplace=False), nn.MaxPool2d(2)]
            in_ch = channels
        self.features = nn.Sequential(*layers)
        if adaptive_pool:
            self.pool: nn.Module = nn.AdaptiveMaxPool2d(1)
            self.feature_dim = channels
        else:
            self.pool = nn.Identity()
            self.feature_dim = channels * (image_size >> 4) ** 2
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The seeds' init: conv N(0, sqrt(2 / (k*k*out))), BN gamma=1 beta=0, Linear default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@register_backbone("conv4")
def conv4(num_classes: int = 5, image_size: int = 32, width: float = 1.0, track_bn_stats: bool = True,
          adaptive_pool: bool = False, **_: object) -> Conv4:
    return Conv4(num_classes, image_size=image_size, width=width, adaptive_pool=adaptive_pool,
                 track_bn_stats=track_bn_stats)
