"""FREE's "implicit gradient alignment": sequential Reptile-style distillation over the round's teachers.

FREE (``main.py`` after warm-up, reference §5): copy the meta-parameters, make one distillation step
on each teacher's recovered task in a fixed order on the copy (a fresh Adam at the outer lr), then
use ``scale * (θ - θ_copy)`` as the meta-gradient of the shared outer optimiser. Expanding the
sequential steps to second order gives ``-Σ_i g_i + lr * Σ_{i<j} H_j g_i``-type terms, i.e. an
implicit push toward directions on which the teachers' gradients agree (Reptile's inner-product term).

This runs where all the round's recovered tasks are (the MetaLearner): TeacherPool actors send the
recovered images and their teachers' logits on them; no teacher is needed here.

Differences from the seeds:

- The loss is ``learner.task_loss_fn`` (``kd_weight * KL(p_t || p_s) + ce_weight * CE``); FREE's
  ``F.kl_div(softmax(s), softmax(t))`` was not a KL (bug B4). Use ``ce_weight=0`` for FREE's KD-only.
- ``scale`` is a parameter (FREE hard-coded 67; a comment says "alpha=40").
- Each task's augmentation is the caller's, per image (FREE shared one crop/flip for all: B15).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import UserError
from .registry import Rule, register_rule

FREE_SCALE = 67.0
OPTIMIZERS = ("adam", "sgd")


def reptile_alignment(learner, params: Mapping[str, Tensor], teacher_tasks: Sequence, *, lr: float = 1e-3,
                      scale: float = FREE_SCALE, optimizer: str = "adam",
                      steps_per_task: int = 1) -> tuple[dict[str, Tensor], dict]:
    """``(grads, stats)``: ``grads[n] = scale * (params[n] - θf[n])`` after sequential distillation.

    ``θf`` starts as a detached copy of ``params``; for each task of ``teacher_tasks`` in the given
    order, ``steps_per_task`` steps (FREE: 1) of ``optimizer`` (``"adam"``, FREE's fresh Adam at the
    outer lr, default betas; or ``"sgd"``) at ``lr`` on ``learner.task_loss_fn`` over the task's
    support and query together, with its teacher logits (``t_support``/``t_query``) when present.
    The optimiser is created per call, so its moments span only this round's teachers (FREE).
    ``params`` are not modified; ``grads`` are detached, on the parameters' devices, keyed alike, to be
    stepped by the outer optimiser (or flattened for the object store). ``stats["losses"]`` holds the
    loss of each step before it was taken.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"reptile_alignment: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not teacher_tasks:
        raise ValueError("reptile_alignment needs at least one teacher task")
    if steps_per_task < 1:
        raise ValueError(f"steps_per_task must be >= 1, got {steps_per_task}")
    names = list(params)
    fast = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    leaves = [fast[n] for n in names]
    opt = (torch.optim.Adam(leaves, lr=lr) if optimizer == "adam" else torch.optim.SGD(leaves, lr=lr))
    losses = []
    with torch.enable_grad():
        for task in teacher_tasks:
            for _ in range(steps_per_task):
                loss = learner.task_loss(fast, task)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                for p, g in zip(leaves, grads):
                    p.grad = g          # None for an unused parameter: the optimiser skips it
                opt.step()
                losses.append(float(loss.detach()))
    out = {n: scale * (params[n].detach() - fast[n].detach()) for n in names}
    return out, {"loss": sum(losses) / len(losses), "losses": losses}


@dataclass
class AlignConfig:
    """Options of the ``align`` rule (``--set align.<option>=...``)."""
    scale: float = FREE_SCALE          # meta-gradient = scale * (theta - theta_copy); FREE hard-coded 67


@register_rule("align")
class Align(Rule):
    """FREE's alignment as an aggregation rule: sequential distillation over the round's teacher tasks
    (in teacher order) on a copy of the meta-parameters, at the learner's outer learning rate."""
    Config = AlignConfig
    needs = "task"

    def __init__(self, options: AlignConfig | None = None, cfg=None):
        super().__init__(options or AlignConfig(), cfg)

    def __call__(self, records, ctx):
        tasks = [r.task.to_task(ctx.device) for r in records]
        grads, st = reptile_alignment(ctx.learner, ctx.params, tasks, lr=ctx.outer_lr, scale=self.options.scale)
        return grads, {"loss": st["loss"]}

    @classmethod
    def validate(cls, cfg) -> None:
        if not cfg.section("align").scale > 0:
            raise UserError(f"config align.scale={cfg.section('align').scale}: must be > 0")


__all__ = ["FREE_SCALE", "Align", "AlignConfig", "reptile_alignment"]
