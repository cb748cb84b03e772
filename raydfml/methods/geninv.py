"""``geninv``: ``deepinv`` with TGR's recovery, a freshly initialised generator per teacher visit."""
from __future__ import annotations

from .base import TeacherRecovery
from .registry import register_method


@register_method("geninv")
class GeneratorInversionMethod(TeacherRecovery):
    preset = {"synth.name": "generator"}


__all__ = ["GeneratorInversionMethod"]
