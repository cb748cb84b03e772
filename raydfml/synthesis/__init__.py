"""Synthesizers: turn teachers into labelled images (one file per method).

- ``deepinv.GeneratorInversion``: TGR's per-teacher recovery through a fresh generator.
- ``purer.PurerDataset``: PURER's learnable synthetic dataset and its episode curriculum.

All return or consume images in [0, 1] pixel space; normalisation with the dataset's statistics
happens inside, right before a teacher sees them.
"""
from .base import BNStatsLoss, Recovered
from .deepinv import GeneratorInversion
from .purer import PurerDataset, purer_teacher_loss

__all__ = ["Recovered", "BNStatsLoss", "GeneratorInversion", "PurerDataset", "purer_teacher_loss"]
