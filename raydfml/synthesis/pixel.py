"""DeepInversion in pixel space: optimise the images themselves against one teacher.

This is DeepInversion proper (Yin et al., 2020) and what reference/glyph_probe.md measured: a fresh
set of learnable images per teacher visit, parametrised as ``sigmoid(logits)`` so pixels stay in
[0, 1], and ``steps`` Adam steps of

    CE(T(normalize(augment(x))), y) + bn_weight * BNStats(T) + tv_weight * TV(normalize(x))
    + l2_weight * ||normalize(x)||

(PURER's per-teacher loss, ``purer_teacher_loss``, applied repeatedly). The lowest-loss iterate is
kept. No generator means no generator convolutions: on CPU one step costs about a teacher
forward/backward, and glyph conv4 teachers reach 100% accuracy on their images within ~10 steps
at lr 0.25 (measured for PURER's dataset, which uses the same loss and parametrisation).
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch
from torch import nn

from ..data.augment import check_augment
from ..errors import UserError
from .base import Recovered, cpu_generator, module_device
from .purer import purer_teacher_loss
from .registry import register_synthesizer


class PixelInversion:
    def __init__(self, image_size: int = 32, per_class: int = 20, steps: int = 30, lr: float = 0.25,
                 bn_weight: float = 0.01, tv_weight: float = 1e-4, l2_weight: float = 1e-5, augment: str = "shift",
                 ce_weight: float = 1.0):
        check_augment(augment)
        if steps < 1 or per_class < 1:
            raise UserError(f"inversion needs steps >= 1 and per_class >= 1 (got steps={steps}, per_class={per_class})")
        self.image_size, self.per_class, self.steps, self.lr = image_size, per_class, steps, lr
        self.loss_cfg = {"bn_weight": bn_weight, "tv_weight": tv_weight, "l2_weight": l2_weight, "augment": augment,
                         "ce_weight": ce_weight}

    def synthesize(self, teacher: nn.Module, classes: Sequence[int], mean: Sequence[float], std: Sequence[float],
                   seed: int, student=None) -> Recovered:
        """``per_class`` images for each of the teacher's classes (head order), seeded by ``seed``."""
        t0 = time.perf_counter()
        classes = tuple(int(c) for c in classes)
        device = module_device(teacher)
        rng = cpu_generator(seed)
        shape = (len(classes) * self.per_class, 3, self.image_size, self.image_size)
        logits = torch.randn(shape, generator=rng).to(device).requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=self.lr)
        kept, kept_loss, kept_acc = None, math.inf, 0.0
        for step in range(self.steps):
            x = torch.sigmoid(logits)
            rec = purer_teacher_loss(teacher, classes, x, mean, std, seed=(seed + 7919 * step) % 2**63, **self.loss_cfg)
            if rec.loss < kept_loss:
                kept, kept_loss, kept_acc = x.detach(), rec.loss, rec.teacher_acc
            opt.zero_grad(set_to_none=True)
            # d loss / d logits = d loss / d x * sigmoid'(logits), without a second teacher pass.
            x.backward(rec.state_grad["rows"])
            opt.step()
        labels = torch.arange(len(classes)).repeat_interleave(self.per_class)
        return Recovered(images=kept.clamp(0, 1).to("cpu", torch.float16), labels=labels, classes=classes,
                         teacher_acc=kept_acc, loss=kept_loss, passes=self.steps, seconds=time.perf_counter() - t0)


@register_synthesizer("pixel")
def build_pixel(sc, image_size: int) -> PixelInversion:
    return PixelInversion(image_size=image_size, per_class=sc.per_class, steps=sc.steps, lr=sc.lr_pixel,
                          bn_weight=sc.bn_weight, ce_weight=sc.ce_weight, tv_weight=sc.tv_weight, augment=sc.augment)


__all__ = ["PixelInversion", "build_pixel"]
