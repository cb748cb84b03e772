"""``geninv``: ``deepinv`` with TGR's recovery, a freshly initialised generator per teacher visit."""
from __future__ import annotations

from .base import TeacherRecovery
from .registry import register_method


@register_method("geninv")
class GeneratorInversionMethod(TeacherRecovery):
    preset = {"synth.name": "generator"}
    # quick: as TGR's recovery (no BN prior; the per-teacher KD loss scaled by 0.1): see tgr.py.
    profiles = {"quick": {"synth.bn_weight": 0.0, "learner.kd_weight": 0.1, "learner.ce_weight": 0.1}}


__all__ = ["GeneratorInversionMethod"]
