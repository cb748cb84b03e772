"""TGR's implicit gradient regularisation (IGR) inside a group of teachers.

For the teachers i = 1..n of one group, with task losses ``L_i`` (TGR: ``CE + KD`` on teacher i's
recovered images), gradients ``g_i = ∇L_i(θ)`` and ``ḡ = mean_i g_i``, the meta-gradient is

    mean_i G_i,    G_i = ∇_θ [ L_i(θ - η (ḡ(θ) - g_i(θ))) ]

(TGR: η = ``displace_lr`` = 1e-3). To first order, ``mean_i L_i(θ - η(ḡ - g_i)) ≈ mean_i L_i +
η/n Σ ||g_i - ḡ||²``: an implicit penalty on the spread of the group's gradients.

Two forms:

- **first order, distributed** (``igr_first_order``): the displacement is a constant, so
  ``G_i = ∇L_i(θ_i')`` at the displaced point ``θ_i' = θ - η(ḡ - g_i)``. Phase 1: every TeacherPool
  actor returns its flat ``g_i`` at the broadcast θ. The MetaLearner calls
  ``igr_first_order(grads, eta)`` for ``ḡ`` and each teacher's offset ``θ_i' - θ``, and sends
  ``θ + offset_i`` back. Phase 2: actors return ``G_i`` at their displaced state; the update is
  their mean (the ``igr`` rule below). Two gradient passes per teacher, no second derivatives.
- **exact, in one process** (``igr_exact``): differentiates through ``g_i`` and ``ḡ``
  (``create_graph=True``, Hessian-vector products), as TGR's code does; needs the whole group's
  tasks in one process and about 3x the memory of a plain step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..learners.base import Params
from .registry import Rule, mean_of, register_rule

LossFn = Callable[[Mapping[str, Tensor]], Tensor]
TGR_ETA = 1e-3


def igr_first_order(grads: Sequence[Tensor], eta: float = TGR_ETA) -> tuple[Tensor, list[Tensor]]:
    """Phase 1 -> phase 2 of the distributed form: ``(ḡ, offsets)`` from the flat per-teacher ``g_i``.

    ``offsets[i] = -eta * (ḡ - g_i)``, so teacher i's displaced state is ``θ + offsets[i]`` (flat,
    in the first gradient's dtype and on its device). Phase 2's ``G_i`` are then averaged with the ``mean`` rule.
    """
    if not grads:
        raise ValueError("igr_first_order needs at least one gradient")
    shapes = {tuple(g.shape) for g in grads}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"igr_first_order expects flat gradients of one length, got shapes {sorted(shapes)}")
    device, dtype = grads[0].device, grads[0].dtype
    stacked = torch.stack([g.detach().to(device, dtype) for g in grads])
    g_bar = stacked.mean(0)
    offsets = [-eta * (g_bar - g) for g in stacked]
    return g_bar, offsets


def igr_first_order_local(loss_fns: Sequence[LossFn], params: Mapping[str, Tensor],
                          eta: float = TGR_ETA) -> tuple[Params, dict]:
    """Both phases of the first-order form in one process (the ``--workers 0`` path and a reference):
    ``mean_i ∇L_i(θ - η(ḡ - g_i))`` with ``g_i``, ``ḡ`` treated as constants. Returns ``(grads, stats)``
    like ``igr_exact``."""
    names = list(params)
    base = {n: params[n].detach() for n in names}
    g = [_grad(fn, base, names) for fn in loss_fns]
    flat = [torch.cat([gi[n].reshape(-1) for n in names]) for gi in g]
    g_bar, offsets = igr_first_order(flat, eta)
    out = {n: torch.zeros_like(base[n]) for n in names}
    losses = []
    for fn, off in zip(loss_fns, offsets):
        displaced = _add_flat(base, off, names)
        G = _grad(fn, displaced, names, losses)
        for n in names:
            out[n] += G[n] / len(loss_fns)
    return out, {"loss": sum(losses) / len(losses), "spread": gradient_spread(flat, g_bar)}


def igr_exact(loss_fns: Sequence[LossFn], params: Mapping[str, Tensor], eta: float = TGR_ETA) -> tuple[Params, dict]:
    """The exact IGR meta-gradient ``∇_θ mean_i L_i(θ - η(ḡ(θ) - g_i(θ)))`` (second order).

    ``loss_fns[i](p)`` is teacher i's loss at parameters ``p`` (a dict like ``params``), e.g. from
    ``task_losses``. ``params`` are not modified. One backward pass through all displaced losses and
    the ``create_graph`` gradients they depend on. Returns ``(grads, stats)``: detached gradients keyed
    like ``params`` (zeros for unused parameters); ``stats`` has the mean displaced loss and
    ``spread`` = (1/2n) Σ ||g_i - ḡ||² (the quantity TGR's commented-out ``reg_loss`` logged).
    """
    if not loss_fns:
        raise ValueError("igr_exact needs at least one loss")
    names = list(params)
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    xs = [leaves[n] for n in names]
    with torch.enable_grad():
        g = []
        for fn in loss_fns:
            gi = torch.autograd.grad(fn(leaves), xs, create_graph=True, allow_unused=True)
            g.append([torch.zeros_like(x) if d is None else d for x, d in zip(xs, gi)])
        n_t = len(loss_fns)
        g_bar = [sum(gi[k] for gi in g) / n_t for k in range(len(xs))]
        displaced_losses = []
        for fn, gi in zip(loss_fns, g):
            displaced = {n: x - eta * (gb - gk) for n, x, gb, gk in zip(names, xs, g_bar, gi)}
            displaced_losses.append(fn(displaced))
        objective = torch.stack(displaced_losses).mean()
        grads = torch.autograd.grad(objective, xs, allow_unused=True)
    out = {n: (torch.zeros_like(x) if d is None else d.detach()) for n, x, d in zip(names, xs, grads)}
    flat = [torch.cat([d.detach().reshape(-1) for d in gi]) for gi in g]
    return out, {"loss": float(objective.detach()), "spread": gradient_spread(flat, torch.stack(flat).mean(0))}


def task_losses(learner, tasks: Sequence) -> list[LossFn]:
    """``L_i(p) = learner.task_loss_fn(learner.forward(p, x_i), y_i, t_i)`` on each task's support and
    query together (all of a teacher's recovered images, as TGR), with its teacher logits when given."""
    return [lambda p, task=task: learner.task_loss(p, task) for task in tasks]


# ----------------------------------------------------------------------------------------- helpers

def _grad(fn: LossFn, params: Mapping[str, Tensor], names: list[str], losses: list | None = None) -> Params:
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad():
        loss = fn(leaves)
        gs = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    if losses is not None:
        losses.append(float(loss.detach()))
    return {n: (torch.zeros_like(leaves[n]) if d is None else d.detach()) for n, d in zip(names, gs)}


def _add_flat(params: Mapping[str, Tensor], vec: Tensor, names: list[str]) -> Params:
    out, offset = {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = params[n] + vec[offset:offset + k].view_as(params[n]).to(params[n].device, params[n].dtype)
        offset += k
    return out


def gradient_spread(flat: list[Tensor], g_bar: Tensor) -> float:
    return float(sum((f - g_bar).pow(2).sum() for f in flat) / (2 * len(flat)))


@dataclass
class IGRConfig:
    """Options of the ``igr`` rule (``--set igr.<option>=...``)."""
    eta: float = TGR_ETA               # displacement learning rate (TGR: 1e-3)
    form: str = "first_order"          # first_order (two passes across the actors) | exact (second order, one process)


FORMS = ("first_order", "exact")


@register_rule("igr")
class IGR(Rule):
    """TGR's implicit gradient regularisation over the round's teachers.

    ``first_order``: two passes. The records of the first carry ``g_i`` (whole-task gradients at θ);
    ``displace`` gives each teacher's state ``θ - η(ḡ - g_i)``; the TeacherPool takes ``G_i`` there,
    and the update is their mean. ``exact``: the records carry the tasks and ``igr_exact`` runs here.
    """
    Config = IGRConfig

    def __init__(self, options: IGRConfig | None = None, cfg=None):
        super().__init__(options or IGRConfig(), cfg)
        self.exact = self.options.form == "exact"
        self.needs = "task" if self.exact else "task_grad"
        self.two_pass = not self.exact

    def displace(self, records, theta: Tensor):
        flat = [torch.from_numpy(np.asarray(r.grad)) for r in records]
        g_bar, offsets = igr_first_order(flat, self.options.eta)
        return [theta + off for off in offsets], {"igr/spread": gradient_spread(flat, g_bar)}

    def __call__(self, records, ctx):
        if not self.exact:          # the second pass: G_i at the displaced states
            return mean_of([torch.from_numpy(np.asarray(r.grad)) for r in records]), {}
        tasks = [r.task.to_task(ctx.device) for r in records]
        grads, st = igr_exact(task_losses(ctx.learner, tasks), ctx.params, self.options.eta)
        return grads, {"loss": st["loss"], "igr/spread": st["spread"]}

    @classmethod
    def validate(cls, cfg) -> None:
        opts = cfg.section("igr")
        if opts.form not in FORMS:
            raise UserError(f"config igr.form={opts.form!r}: choose {' or '.join(FORMS)}")
        if opts.eta < 0:
            raise UserError(f"config igr.eta={opts.eta}: must be 0 or more")


__all__ = ["IGR", "IGRConfig", "TGR_ETA", "gradient_spread", "igr_exact", "igr_first_order", "igr_first_order_local", "task_losses"]
