"""Shared pieces of the meta-learners: the task record, losses, the functional forward, helpers.

Conventions every learner follows
---------------------------------
- **Parameters are a dict** ``name -> Tensor`` (``Learner.init_params()``), passed explicitly to
  every call; the ``nn.Module`` is only a skeleton for ``torch.func.functional_call``. No ``.fast``
  attributes, no global flags, nothing is written into the module.
- **One task in, one gradient out.** ``meta_grads(params, task)`` returns the gradient of the
  learner's meta-objective for *one* task, detached, keyed like ``params``. Meta-batching is the
  caller's job: it takes the **mean** of the per-task gradients (``mean_grads``; the seeds summed
  the losses of the meta-batch, which scales the effective learning rate with the batch size) or a
  weighted combination (task weighting, grouping), then calls ``apply_grads(optimizer, params, g)``.
  Flat vectors (``flatten``/``unflatten``) are what crosses Ray's object store.
- **BatchNorm is transductive**, as in all the seeds: the meta-model is built with
  ``track_bn_stats=False`` so every BN layer normalises with the statistics of the batch it is
  given, at meta-training *and* at test time. Support and query are separate forward passes, so the
  support is normalised with support statistics and the query with query statistics. There are no
  BN buffers, hence nothing that ``functional_call`` could update in place; a model that does track
  running statistics is rejected.
- **Device-agnostic**: tensors stay where the caller put them; nothing here names a device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import UserError

Params = dict[str, Tensor]
METRICS = ("euclidean", "cosine")            # ProtoNet's logits (``metric``); the others ignore it


@dataclass
class Task:
    """One few-shot episode, already normalised float tensors on the meta-model's device.

    Labels are relative (``0..way-1``, int64). ``t_support``/``t_query`` are optional teacher
    logits restricted to the task's ``way`` classes (same column order as the relative labels);
    when present the task loss adds a distillation term (``Learner.task_loss_fn``).
    """

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor
    t_support: Tensor | None = None
    t_query: Tensor | None = None

    @property
    def way(self) -> int:
        if self.t_support is not None:
            return int(self.t_support.shape[1])
        return int(self.y_support.max()) + 1


def whole_task(task: Task) -> tuple[Tensor, Tensor, Tensor | None]:
    """A task's support and query as one batch (images, labels, teacher logits or None): all of a
    teacher's recovered images, as FREE and TGR distil on them."""
    x = torch.cat([task.x_support, task.x_query])
    y = torch.cat([task.y_support, task.y_query])
    t = None
    if task.t_support is not None and task.t_query is not None:
        t = torch.cat([task.t_support, task.t_query])
    return x, y, t


# ----------------------------------------------------------------------------------------- losses

def distill_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Knowledge-distillation loss ``KL(softmax(t/T) || softmax(s/T)) * T**2`` averaged over the batch.

    This is ``F.kl_div(log_softmax(s/T), softmax(t/T), reduction='batchmean') * T**2`` (computed with
    ``log_target=True`` for stability). The seeds passed *probabilities* as the first argument of
    ``F.kl_div`` with ``reduction='mean'`` (FREE/TGR bug B4), which is not a KL divergence; this is
    the corrected loss. The teacher is treated as a constant (its logits are detached).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def accuracy_of(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(dim=-1) == y).float().mean())


# ---------------------------------------------------------------------------------------- helpers

def flatten(tensors: Mapping[str, Tensor], names: Sequence[str] | None = None) -> Tensor:
    """Concatenate ``tensors[n]`` for ``n`` in ``names`` (default: the mapping's order) into a 1-D tensor.

    Detached; use the same ``names`` (e.g. ``list(params)``) on both sides of the object store.
    """
    names = list(tensors) if names is None else list(names)
    if not names:
        raise ValueError("flatten: nothing to flatten")
    return torch.cat([tensors[n].detach().reshape(-1) for n in names])


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of ``flatten(like)``: split ``vec`` into tensors shaped like ``like`` (same order).

    The pieces are views of ``vec`` (cast to each reference tensor's dtype and moved to its device).
    """
    total = sum(t.numel() for t in like.values())
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(f"unflatten: expected a 1-D vector of {total} elements, got shape {tuple(vec.shape)}")
    out: Params = {}
    offset = 0
    for name, ref in like.items():
        n = ref.numel()
        out[name] = vec[offset:offset + n].view(ref.shape).to(device=ref.device, dtype=ref.dtype)
        offset += n
    return out


def mean_grads(grads: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | Tensor | None = None) -> Params:
    """(Weighted) mean of per-task gradient dicts; with ``weights`` it is ``sum_i w_i g_i / sum_i w_i``."""
    if not grads:
        raise ValueError("mean_grads: no gradients")
    if weights is None:
        w = [1.0 / len(grads)] * len(grads)
    else:
        w = [float(x) for x in weights]
        if len(w) != len(grads):
            raise ValueError(f"mean_grads: {len(grads)} gradients but {len(w)} weights")
        s = sum(w)
        if s == 0:
            raise ValueError("mean_grads: weights sum to zero")
        w = [x / s for x in w]
    return {n: sum(wi * g[n] for wi, g in zip(w, grads)) for n in grads[0]}


def apply_grads(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor],
                grads: Mapping[str, Tensor]) -> None:
    """Set ``params[n].grad = grads[n]`` (a copy; ``None`` for names without a gradient) and step.

    ``params`` are the meta-parameters the optimiser was built over (``Learner.init_params()``).
    Gradients are overwritten, never accumulated, so no ``zero_grad`` is needed.
    """
    unknown = set(grads) - set(params)
    if unknown:
        raise KeyError(f"apply_grads: gradients for unknown parameters {sorted(unknown)[:5]}")
    for name, p in params.items():
        g = grads.get(name)
        p.grad = None if g is None else g.detach().to(device=p.device, dtype=p.dtype).clone()
    optimizer.step()


class _FeatureNet(nn.Module):
    """``forward`` = ``model.forward_features``, so it can be called with ``functional_call``.

    Its parameters are the model's, under the prefix ``model.``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


# ---------------------------------------------------------------------------------------- learner

class Learner:
    """Base class: functional forward, task loss, the inner SGD loop, test-time prediction.

    Parameters (the same for every learner so one config serves all; learners ignore what they do
    not use):

    - ``inner_lr``: inner-loop SGD step size (seeds: 0.01).
    - ``inner_steps``: inner steps during meta-training (seeds: 5; PURER 1).
    - ``test_inner_steps``: inner steps for ``predict``/``accuracy`` (seeds: 10; PURER 1).
    - ``first_order``: MAML/ANIL only. True (default, memory-light) treats the inner gradients as
      constants; False differentiates through the inner loop (``create_graph=True``).
    - ``kd_weight``, ``ce_weight``, ``temperature``: task loss with teacher logits,
      ``kd_weight * distill_loss(s, t, T) + ce_weight * CE(s, y)``.
    - ``distill_via``: how a teacher's task is distilled into the meta-model (``task_loss``, used by the
      alignment rules and PURER's hardening): ``learner`` through the learner's own prediction rule
      (MAML-family: the head; ProtoNet: prototypes of the support), ``head`` always through the
      linear head on support and query together (ProtoNet never trains or uses that head).
    - ``joint_bn``: ProtoNet only: support and query go through BatchNorm as one batch (Snell et al.'s
      code), instead of each with its own batch statistics (at 1-shot: 5 support images).
    - ``metric``, ``metric_scale``: ProtoNet only: ``euclidean`` logits are minus the squared distance
      to the prototypes (Snell et al.); ``cosine`` ones ``metric_scale`` times the cosine between the
      L2-normalised query feature and the prototype of the normalised support features.
    """

    name = "base"
    #: parameters adapted by the inner loop: every parameter whose name starts with one of these
    #: prefixes ("" = all parameters).
    adapt_prefixes: tuple[str, ...] = ("",)

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5,
                 test_inner_steps: int = 10, first_order: bool = True, kd_weight: float = 1.0,
                 ce_weight: float = 1.0, temperature: float = 1.0, distill_via: str = "learner",
                 joint_bn: bool = False, metric: str = "euclidean", metric_scale: float = 10.0):
        _check_model(model)
        if not inner_lr > 0:
            raise UserError(f"learner option inner_lr must be > 0, got {inner_lr}")
        for key, val in (("inner_steps", inner_steps), ("test_inner_steps", test_inner_steps)):
            if int(val) != val or val < 0:
                raise UserError(f"learner option {key} must be an integer >= 0, got {val}")
        if not temperature > 0:
            raise UserError(f"learner option temperature must be > 0, got {temperature}")
        if kd_weight < 0 or ce_weight < 0:
            raise UserError(f"learner options kd_weight/ce_weight must be >= 0, got {kd_weight}/{ce_weight}")
        if distill_via not in ("learner", "head"):
            raise UserError(f"learner option distill_via must be learner or head, got {distill_via!r}")
        if metric not in METRICS:
            raise UserError(f"learner option metric must be {' or '.join(METRICS)}, got {metric!r}")
        if not metric_scale > 0:
            raise UserError(f"learner option metric_scale must be > 0, got {metric_scale}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.test_inner_steps = int(test_inner_steps)
        self.first_order = bool(first_order)
        self.kd_weight = float(kd_weight)
        self.ce_weight = float(ce_weight)
        self.temperature = float(temperature)
        self.distill_via = distill_via
        self.joint_bn = bool(joint_bn)
        self.metric, self.metric_scale = metric, float(metric_scale)
        self._features_net = _FeatureNet(model) if hasattr(model, "forward_features") else None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
                f"test_inner_steps={self.test_inner_steps}, first_order={self.first_order}, "
                f"kd_weight={self.kd_weight}, ce_weight={self.ce_weight}, temperature={self.temperature})")

    # -- parameters and forward ------------------------------------------------------------------
    def init_params(self) -> Params:
        """Detached copies of the model's parameters with ``requires_grad=True``: the meta-parameters."""
        return {n: p.detach().clone().requires_grad_(True) for n, p in self.model.named_parameters()}

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Logits of the model with ``params`` (functional; BN uses the statistics of ``x``)."""
        return functional_call(self.model, dict(params), (x,))

    def features(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``model.forward_features(x)`` with ``params`` (the flattened input of the head)."""
        if self._features_net is None:
            raise TypeError(f"{type(self.model).__name__} has no forward_features method")
        return functional_call(self._features_net, {"model." + n: v for n, v in params.items()}, (x,))

    def whole_task_loss(self, params: Mapping[str, Tensor], task: Task) -> Tensor:
        """The task loss (KD + CE) at ``params`` on the task's support and query together, through the head."""
        x, y, t = whole_task(task)
        return self.task_loss_fn(self.forward(params, x), y, t)

    def task_loss(self, params: Mapping[str, Tensor], task: Task) -> Tensor:
        """A teacher's task distilled into the meta-model at ``params`` (no inner loop): what the
        alignment rules differentiate. MAML-family: the head on support and query together."""
        return self.whole_task_loss(params, task)

    def outer_loss(self, params: Mapping[str, Tensor], task: Task, create_graph: bool = True) -> Tensor:
        """The meta-objective of one task (adapt on the support, CE on the query), differentiable
        w.r.t. the task's images (PURER's hardening maximises it)."""
        fast = self.adapt(params, task.x_support, task.y_support, create_graph=create_graph)
        return F.cross_entropy(self.forward(fast, task.x_query), task.y_query)

    def adapted_names(self, params: Mapping[str, Tensor]) -> list[str]:
        """Names of the parameters the inner loop updates."""
        return [n for n in params if n.startswith(self.adapt_prefixes)]

    # -- losses ------------------------------------------------------------------------------------
    def task_loss_fn(self, logits: Tensor, y: Tensor, t: Tensor | None = None) -> Tensor:
        """CE(logits, y) when ``t`` is None, else ``kd_weight * distill + ce_weight * CE``.

        With teacher logits, ``y`` are the labels the task was built with (for synthetic tasks the
        teacher's argmax-consistent labels).
        """
        ce = F.cross_entropy(logits, y)
        if t is None:
            return ce
        return self.kd_weight * distill_loss(logits, t, self.temperature) + self.ce_weight * ce

    # -- inner loop --------------------------------------------------------------------------------
    def _inner_loop(self, params: Params, names: Sequence[str], loss_of: Callable[[Params], Tensor],
                    steps: int, create_graph: bool, track: bool) -> Params:
        """``steps`` plain SGD steps at ``inner_lr`` on ``params[names]``.

        ``track=True``: the returned tensors stay functions of ``params`` (second order when
        ``create_graph``, else the inner gradients enter as constants: first order).
        ``track=False``: every step is detached (test time, Reptile); no graph survives.
        """
        fast = dict(params)
        if not names or steps == 0:
            return fast
        with torch.enable_grad():
            for n in names:
                if not track:
                    fast[n] = fast[n].detach().requires_grad_(True)
                elif not fast[n].requires_grad:
                    fast[n] = fast[n].detach().requires_grad_(True)
            for _ in range(steps):
                loss = loss_of(fast)
                grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=create_graph)
                for n, g in zip(names, grads):
                    new = fast[n] - self.inner_lr * g
                    fast[n] = new.detach().requires_grad_(True) if not track else new
        if not track:
            fast = {n: v.detach() for n, v in fast.items()}
        return fast

    def adapt(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, t: Tensor | None = None,
              steps: int | None = None, create_graph: bool = False) -> Params:
        """Inner loop on (``x``, ``y``[, teacher logits ``t``]): adapted parameters (all names kept).

        ``steps`` defaults to ``inner_steps``. The result stays differentiable w.r.t. ``params``
        (through the inner gradients too when ``create_graph``). Parameters that do not require
        grad are treated as new leaves.
        """
        steps = self.inner_steps if steps is None else int(steps)
        return self._inner_loop(dict(params), self.adapted_names(params),
                                lambda p: self.task_loss_fn(self.forward(p, x), y, t),
                                steps, create_graph=create_graph, track=True)

    # -- meta-objective ----------------------------------------------------------------------------
    def meta_grads(self, params: Mapping[str, Tensor], task: Task) -> tuple[Params, dict]:
        """Gradient of the meta-objective for one task w.r.t. ``params`` (detached, same keys) and
        ``{"loss": query loss after adaptation, "acc": query accuracy after adaptation}``.

        The caller averages these over the meta-batch (mean, not the seeds' sum) and steps its
        optimiser with ``apply_grads``. ``params`` are not modified and need not require grad.
        """
        raise NotImplementedError

    @staticmethod
    def _leaves(params: Mapping[str, Tensor]) -> Params:
        """Fresh leaves sharing storage with ``params``: the graph of a meta-gradient stays local."""
        return {n: v.detach().requires_grad_(True) for n, v in params.items()}

    # -- evaluation --------------------------------------------------------------------------------
    def predict(self, params: Mapping[str, Tensor], x_support: Tensor, y_support: Tensor,
                x_query: Tensor, steps: int | None = None) -> Tensor:
        """Query logits after test-time adaptation on the support (``test_inner_steps`` by default).

        No graph is kept: the inner loop runs on detached copies and the result is detached.
        """
        steps = self.test_inner_steps if steps is None else int(steps)
        base = {n: v.detach() for n, v in params.items()}
        fast = self._inner_loop(base, self.adapted_names(base),
                                lambda p: F.cross_entropy(self.forward(p, x_support), y_support),
                                steps, create_graph=False, track=False)
        with torch.no_grad():
            return self.forward(fast, x_query)

    def accuracy(self, params: Mapping[str, Tensor], task: Task, steps: int | None = None) -> float:
        """Query accuracy of ``predict`` on ``task``."""
        logits = self.predict(params, task.x_support, task.y_support, task.x_query, steps=steps)
        return accuracy_of(logits, task.y_query)


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"learner model must be an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            raise ValueError(
                f"meta-model BatchNorm {name!r} tracks running statistics; build the meta-model with "
                "build_model(..., track_bn_stats=False) so BN uses batch statistics (transductive) and "
                "functional calls never update buffers")


def _iter_prefixed(params: Mapping[str, Tensor], prefix: str) -> Iterable[tuple[str, Tensor]]:
    return ((n[len(prefix):], v) for n, v in params.items() if n.startswith(prefix))
