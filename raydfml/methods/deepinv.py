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
    preset = {"synth.name": "pixel"}


__all__ = ["DeepInversion"]
