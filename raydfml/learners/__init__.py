"""Meta-learners by name: MAML (first/second order), ANIL, ProtoNet, Reptile.

``build_learner(name, model, **cfg)`` is the one constructor; ``model`` is the meta-model skeleton
(``build_model(..., track_bn_stats=False)``). A learner holds no parameters of its own: the
meta-parameters are a dict from ``learner.init_params()`` that the caller owns and optimises::

    learner = build_learner("maml", build_model("conv4", track_bn_stats=False), inner_steps=5)
    params = learner.init_params()
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    for batch in meta_batches:
        per_task = [learner.meta_grads(params, task) for task in batch]
        apply_grads(opt, params, mean_grads([g for g, _ in per_task]))   # mean over tasks

See ``raydfml.learners.base`` for the conventions (transductive BN, mean meta-batching, flat
gradient vectors for the object store).
"""
from __future__ import annotations

import inspect

from torch import nn

from ..errors import UserError
from .base import (METRICS, Learner, Params, Task, accuracy_of, apply_grads, distill_loss, flatten, mean_grads,
                   unflatten)
from .maml import ANIL, MAML
from .protonet import ProtoNet, proto_logits, prototypes
from .reptile import Reptile

LEARNERS: dict[str, type[Learner]] = {"maml": MAML, "anil": ANIL, "protonet": ProtoNet, "reptile": Reptile}


def learner_options() -> list[str]:
    """Option names ``build_learner`` accepts (the same for every learner)."""
    return [p for p in inspect.signature(Learner.__init__).parameters if p not in ("self", "model")]


def check_metric(name: str, metric: str, scale: float) -> None:
    """The config's ``learner.metric``/``metric_scale`` for learner ``name`` (a one-line UserError)."""
    if metric not in METRICS:
        raise UserError(f"config learner.metric={metric!r}: choose {' or '.join(METRICS)}")
    if metric != "euclidean" and name != "protonet":
        raise UserError(f"config learner.metric={metric!r}: only learner.name=protonet compares features "
                        f"to prototypes (learner {name!r} classifies with its head)")
    if not scale > 0:
        raise UserError(f"config learner.metric_scale={scale}: must be > 0")


def build_learner(name: str, model: nn.Module, **cfg) -> Learner:
    """The learner called ``name`` (maml, anil, protonet, reptile) over ``model``.

    ``cfg`` holds ``Learner`` options (inner_lr, inner_steps, test_inner_steps, first_order,
    kd_weight, ce_weight, temperature). An unknown name or option, or a bad value, is a ``UserError``.
    """
    key = str(name).lower()
    if key not in LEARNERS:
        raise UserError(f"unknown learner {name!r}; choose one of {', '.join(LEARNERS)}")
    allowed = learner_options()
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise UserError(f"unknown option(s) for learner {key!r}: {', '.join(unknown)}; "
                        f"valid options: {', '.join(allowed)}")
    return LEARNERS[key](model, **cfg)


__all__ = ["ANIL", "LEARNERS", "METRICS", "Learner", "MAML", "Params", "ProtoNet", "Reptile", "Task",
           "accuracy_of", "apply_grads", "build_learner", "check_metric", "distill_loss", "flatten",
           "learner_options", "mean_grads", "proto_logits", "prototypes", "unflatten"]
