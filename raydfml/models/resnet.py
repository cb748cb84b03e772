"""ResNet10/18/50 as in the DFML seeds (CloserLookFewShot variant).

Stem: Conv3x3(64, stride 1) -> BN, with no ReLU and no max-pool after it (as the seeds do).
resnet10/18: BasicBlocks [1,1,1,1] / [2,2,2,2], widths 64/128/256/512, shortcut 1x1 conv + BN.
resnet50: Bottlenecks [3,4,6,3], widths 256/512/1024/2048, bottleneck width out/4; its 3x3 conv
has a bias and its projection shortcut has no BN (the seeds' definition).
Stride 2 at the first block of stages 2-4; AdaptiveAvgPool -> Linear, so any input size works.
``width`` multiplies every channel count (CPU profiles narrow the ResNets this way).
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import register_backbone


def _bn(c: int, track: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, track_running_stats=track)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, track: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = _bn(out_ch, track)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = _bn(out_ch, track)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _bn(out_ch, track))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, track: bool):
        super().__init__()
        mid = max(1, out_ch // 4)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = _bn(mid, track)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=True)
        self.bn2 = _bn(mid, track)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn3 = _bn(out_ch, track)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], depths: list[int], widths: list[int], num_classes: int = 5,
                 width: float = 1.0, track_bn_stats: bool = True):
        super().__init__()
        scale = lambda c: max(1, int(round(c * width)))  # noqa: E731
        stem = scale(64)
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), _bn(stem, track_bn_stats))
        stages: list[nn.Module] = []
        in_ch = stem
        for i, (depth, out) in enumerate(zip(depths, widths)):
            out = scale(out)
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(block(in_ch, out, stride, track_bn_stats))
                in_ch = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@register_backbone("resnet10")
def resnet10(num_classes: int = 5, width: float = 1.0, track_bn_stats: bool = True, **_: object) -> ResNet:
    return ResNet(BasicBlock, [1, 1, 1, 1], [64, 128, 256, 512], num_classes, width, track_bn_stats)


@register_backbone("resnet18")
def resnet18(num_classes: int = 5, width: float = 1.0, track_bn_stats: bool = True, **_: object) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, width, track_bn_stats)


@register_backbone("resnet50")
def resnet50(num_classes: int = 5, width: float = 1.0, track_bn_stats: bool = True, **_: object) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], [256, 512, 1024, 2048], num_classes, width, track_bn_stats)
