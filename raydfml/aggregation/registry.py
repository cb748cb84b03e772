"""The aggregation-rule registry: how the MetaLearner turns a round's per-teacher records into one
meta-update.

A rule receives the round's ``TeacherRecord``s (teacher id, flat gradient, loss, the teacher's
accuracy on its recovered images, and the teacher's task when the rule asks for it) and a
``RuleContext`` (the learner and the current meta-parameters), and returns ``(grads, stats)``:
``grads`` a flat tensor or a dict keyed like the parameters, ``stats`` metrics to log (a ``"loss"``
entry is logged as ``kd/loss``). A rule is a plain function::

    @register_rule("mean")
    def mean(records, ctx):
        return torch.stack([torch.from_numpy(r.grad) for r in records]).mean(0), {}

or, when it has options or state, a ``Rule`` subclass: ``Config`` is its typed option section
(``--set <name>.<option>=...``), ``state_dict``/``load_state_dict`` go into the MetaLearner's
checkpoint. ``needs`` says what each record must carry:

- ``"meta_grad"``: the learner's meta-gradient of the teacher's task (distillation on the query set);
- ``"task_grad"``: the gradient of the teacher's whole-task loss (KD + CE on all its images);
- ``"task"``: the task itself, for rules that differentiate through several tasks at once.

A rule with ``two_pass = True`` also implements ``displace(records, theta)``: the per-teacher
parameter states at which the TeacherPool takes a second gradient (TGR's first-order IGR); the
records of that second pass are then aggregated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..registry import Registry

NEEDS = ("meta_grad", "task_grad", "task")

RULES = Registry("aggregation rule", builtins=("raydfml.aggregation.mean", "raydfml.aggregation.free",
                                               "raydfml.aggregation.tgr"))


@dataclass
class RuleContext:
    """What a rule may use besides the records: the MetaLearner's learner, its current parameters
    (a dict, not to be modified), the device, the learner's outer learning rate."""
    learner: Any
    params: Mapping[str, Tensor]
    device: torch.device
    outer_lr: float


class Rule:
    """Base of the rules that are classes (options or state); plain functions need none of this."""
    Config: type | None = None
    needs: str = "meta_grad"
    two_pass: bool = False

    def __init__(self, options: Any = None, cfg: Any = None):
        self.options = options

    def __call__(self, records: Sequence, ctx: RuleContext) -> tuple[Tensor | dict[str, Tensor], dict]:
        raise NotImplementedError

    def displace(self, records: Sequence, theta: Tensor) -> tuple[list[Tensor], dict]:
        raise NotImplementedError(f"{type(self).__name__} is not a two-pass rule")

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Raise ``UserError`` for option values the rule cannot run with."""


class FunctionRule(Rule):
    """A plain function registered as a rule."""

    def __init__(self, fn: Callable, options: Any = None, cfg: Any = None):
        super().__init__(options, cfg)
        self.fn = fn
        self.needs = getattr(fn, "needs", "meta_grad")

    def __call__(self, records, ctx):
        return self.fn(records, ctx)


def register_rule(name: str, *, needs: str | None = None):
    """Register a rule function or ``Rule`` class as ``name``; ``needs`` (functions only) as above."""
    def add(obj):
        if needs is not None:
            if needs not in NEEDS:
                raise ValueError(f"rule {name!r}: needs must be one of {NEEDS}, got {needs!r}")
            obj.needs = needs
        return RULES.register(name, obj)
    return add


def build_rule(cfg) -> Rule:
    """The configured rule (``aggregate.rule``) with its option section."""
    entry = RULES.get(cfg.aggregate.rule, option="config aggregate.rule")
    options = cfg.sections.get(cfg.aggregate.rule) if getattr(entry, "Config", None) else None
    if isinstance(entry, type):
        return entry(options, cfg)
    return FunctionRule(entry, options, cfg)


def mean_of(grads: Sequence[Tensor]) -> Tensor:
    """The element-wise mean of flat gradients (float32)."""
    if not grads:
        raise ValueError("mean_of() needs at least one gradient")
    return torch.stack([g.float() for g in grads]).mean(0)


__all__ = ["NEEDS", "RULES", "Rule", "RuleContext", "FunctionRule", "register_rule", "build_rule", "mean_of"]
