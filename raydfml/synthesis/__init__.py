"""Synthesizers: turn teachers into labelled images (one file per method).

- ``pixel.PixelInversion``: DeepInversion in pixel space (``synth.name=pixel``).
- ``deepinv.GeneratorInversion``: TGR's per-teacher recovery through a fresh generator (``generator``).
- ``free``: FREE's meta-generator, adapted to each teacher in a few steps.
- ``purer.PurerDataset``: PURER's learnable synthetic dataset and its episode curriculum.

All return or consume images in [0, 1] pixel space; normalisation with the dataset's statistics
happens inside, right before a teacher sees them.
"""
from .base import BNStatsLoss, Recovered
from .deepinv import GeneratorInversion
from .purer import PurerDataset, purer_teacher_loss
from .registry import SYNTHESIZERS, build_synthesizer, register_synthesizer

__all__ = ["Recovered", "BNStatsLoss", "GeneratorInversion", "PurerDataset", "purer_teacher_loss", "SYNTHESIZERS",
           "build_synthesizer", "register_synthesizer"]
