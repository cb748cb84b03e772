"""``deepinv``: DeepInversion of each teacher in pixel space, then per-teacher distillation.

Per round: each drawn teacher is inverted by the ``pixel`` synthesizer on its TeacherPool actor; the
recovered images enter the task memory bank; each teacher's meta-gradient of its distillation task
at the broadcast meta-parameters is combined by the configured rule (``mean``); replay follows.
"""
from __future__ import annotations

from .base import TeacherRecovery
from .registry import register_method


@register_method("deepinv")
class DeepInversion(TeacherRecovery):
    # Pixel inversion's own loss weights (PURER's per-teacher loss): BN statistics at 0.01, a +-2 px
    # shift inside the loss (the generator methods use synth.bn_weight 1.0 and crop augmentation).
    preset = {"synth.name": "pixel", "synth.bn_weight": 0.01, "synth.augment": "shift"}
    # quick: the per-teacher KD loss scaled by 0.1 so that its gradient (norm 4-12) does not fill the Adam
    # moments it shares with replay (mr: 32.5 / 46.5 -> 34.1 / 49.1; see docs/fidelity.md).
    profiles = {"quick": {"learner.kd_weight": 0.1, "learner.ce_weight": 0.1}}


__all__ = ["DeepInversion"]
