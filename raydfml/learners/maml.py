"""MAML (first and second order) and ANIL, with ``torch.func.functional_call``.

MAML (Finn et al. 2017), as in PURER(-Plus)/FREE/TGR: the inner loop is plain SGD at ``inner_lr``
on *all* parameters (BN affine included) for ``inner_steps`` steps on the support loss; the meta-
objective is the query loss at the adapted parameters.

- ``first_order=True`` (default; the seeds' ``--approx``): inner gradients are constants, so the
  meta-gradient is the gradient of the query loss at the adapted parameters (FOMAML). Memory is one
  forward/backward at a time.
- ``first_order=False``: differentiates through the inner loop (``create_graph=True``): Hessian-
  vector products, memory grows with ``inner_steps``.

ANIL (Raghu et al. 2020; PURER-Plus ``--teacherMethod anil``): the inner loop adapts only the head,
the parameters named ``classifier.*``; the meta-gradient reaches all parameters. Because the body is
fixed during the inner loop, support features are computed once and only the head is re-run per
step; this relies on ``model(x) == model.classifier(model.forward_features(x))``, which holds for
every backbone in ``raydfml.models``.

BatchNorm uses batch statistics (support batch, then query batch), at training and test time.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .base import Learner, Params, Task, _iter_prefixed, accuracy_of


class MAML(Learner):
    """Model-agnostic meta-learning; see the module docstring. Per-task API in ``Learner``."""

    name = "maml"

    def meta_grads(self, params: Mapping[str, Tensor], task: Task) -> tuple[Params, dict]:
        """Meta-gradient of one task: ``d/dθ L_query(adapt(θ, support))``.

        First order: the inner gradients are constants, so this equals the gradient of the query loss
        w.r.t. the adapted parameters. Second order: exact, through the inner loop. With
        ``inner_steps=0`` both are the plain gradient of the query loss at ``θ``. The caller
        averages over the meta-batch (mean) and steps its optimiser.
        """
        leaves = self._leaves(params)
        with torch.enable_grad():
            fast = self.adapt(leaves, task.x_support, task.y_support, task.t_support,
                              create_graph=not self.first_order)
            logits = self.forward(fast, task.x_query)
            loss = self.task_loss_fn(logits, task.y_query, task.t_query)
            names = list(leaves)
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        out = {n: (torch.zeros_like(leaves[n]) if g is None else g.detach()) for n, g in zip(names, grads)}
        return out, {"loss": float(loss.detach()), "acc": accuracy_of(logits.detach(), task.y_query)}


class ANIL(MAML):
    """Almost No Inner Loop: MAML whose inner loop adapts only ``classifier.*``."""

    name = "anil"
    head_prefix = "classifier."
    adapt_prefixes = (head_prefix,)

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        if not isinstance(getattr(model, "classifier", None), nn.Module) or self._features_net is None:
            raise TypeError(f"ANIL needs a model with a 'classifier' head and forward_features; "
                            f"{type(model).__name__} has not")
        if not any(n.startswith(self.head_prefix) for n, _ in model.named_parameters()):
            raise TypeError("ANIL: the model has no parameters named 'classifier.*'")

    def head(self, params: Mapping[str, Tensor], feats: Tensor) -> Tensor:
        """The head ``classifier`` applied to features, with the ``classifier.*`` entries of ``params``."""
        return functional_call(self.model.classifier, dict(_iter_prefixed(params, self.head_prefix)), (feats,))

    def _adapt_head(self, params: Params, feats: Tensor, y: Tensor, t: Tensor | None, steps: int,
                    create_graph: bool, track: bool) -> Params:
        return self._inner_loop(params, self.adapted_names(params),
                                lambda p: self.task_loss_fn(self.head(p, feats), y, t),
                                steps, create_graph=create_graph, track=track)

    def adapt(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, t: Tensor | None = None,
              steps: int | None = None, create_graph: bool = False) -> Params:
        steps = self.inner_steps if steps is None else int(steps)
        params = dict(params)
        with torch.enable_grad():
            feats = self.features(params, x)
        if not create_graph:
            # First order: the inner gradients are constants, so the support features' dependence on
            # the body is not needed (the body's meta-gradient comes from the query forward).
            feats = feats.detach()
        return self._adapt_head(params, feats, y, t, steps, create_graph=create_graph, track=True)

    def predict(self, params: Mapping[str, Tensor], x_support: Tensor, y_support: Tensor,
                x_query: Tensor, steps: int | None = None) -> Tensor:
        steps = self.test_inner_steps if steps is None else int(steps)
        base = {n: v.detach() for n, v in params.items()}
        with torch.no_grad():
            feats_s = self.features(base, x_support)
            feats_q = self.features(base, x_query)
        fast = self._inner_loop(base, self.adapted_names(base),
                                lambda p: F.cross_entropy(self.head(p, feats_s), y_support),
                                steps, create_graph=False, track=False)
        with torch.no_grad():
            return self.head(fast, feats_q)
