"""Aggregation rules: how the MetaLearner combines per-teacher gradients into one meta-update.

``aggregate(rule, grads)`` takes flat gradient vectors (what crosses Ray's object store). Rules that
need more than a list of gradients (FREE's alignment, TGR's groups) live in their own modules.
"""
from __future__ import annotations

import torch

from ..errors import UserError


def mean(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.float() for g in grads]).mean(0)


RULES = {"mean": mean}


def aggregate(rule: str, grads: list[torch.Tensor]) -> torch.Tensor:
    if rule not in RULES:
        raise UserError(f"aggregation rule {rule!r}: choose one of {', '.join(RULES)}")
    if not grads:
        raise ValueError("aggregate() needs at least one gradient")
    return RULES[rule](grads)
