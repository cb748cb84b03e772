"""The ``mean`` rule: the plain average of the teachers' gradients (the default)."""
from __future__ import annotations

import numpy as np
import torch

from .registry import mean_of, register_rule


@register_rule("mean", needs="meta_grad")
def mean(records, ctx):
    """Each teacher's meta-gradient counts the same."""
    return mean_of([torch.from_numpy(np.asarray(r.grad)) for r in records]), {}
