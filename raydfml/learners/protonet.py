"""Prototypical networks (Snell et al. 2017), as in PURER-Plus ``--teacherMethod protonet``.

Embeddings are ``model.forward_features`` (the flattened input of the head; the head itself is
unused). Class prototypes are the means of the support embeddings; logits are the negative squared
Euclidean distances ``-||f(q) - p_c||^2`` (no temperature), or with ``metric="cosine"`` the scaled
cosines ``s * <f(q)/||f(q)||, p_c/||p_c||>`` with ``p_c`` the mean of the normalised support
embeddings (``s`` = ``metric_scale``; Chen et al. 2019's cosine classifiers use a fixed 10); trained
with the task loss (CE, plus distillation when the task carries teacher logits for the query). There is no inner loop: ``adapt``
is the identity and ``predict`` uses the support prototypes without fine-tuning.

Support and query are embedded in separate forward passes, so BatchNorm normalises each with its own
batch statistics (transductive, as the seeds), unless ``joint_bn``: then one forward pass over both,
so BN's statistics come from the whole task (at 1-shot the support alone is 5 images).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Learner, Params, Task, accuracy_of


def prototypes(feats: Tensor, y: Tensor, way: int | None = None) -> Tensor:
    """Per-class means of ``feats`` (``[n, d]``) for labels ``0..way-1``: ``[way, d]``."""
    way = int(y.max()) + 1 if way is None else int(way)
    sums = torch.zeros(way, feats.shape[1], dtype=feats.dtype, device=feats.device).index_add(0, y, feats)
    counts = torch.bincount(y, minlength=way).clamp_min(1).to(feats.dtype)
    return sums / counts[:, None]


def cosine_logits(query_feats: Tensor, support_feats: Tensor, y_support: Tensor, way: int | None,
                  scale: float) -> Tensor:
    """``scale`` x the cosine between each L2-normalised query feature and each class's prototype (the
    mean of the normalised support features): ``[n_query, way]``."""
    protos = prototypes(F.normalize(support_feats, dim=1), y_support, way)
    return scale * F.normalize(query_feats, dim=1) @ F.normalize(protos, dim=1).T


def proto_logits(query_feats: Tensor, protos: Tensor) -> Tensor:
    """``-||q - p||^2`` for every (query, prototype) pair: ``[n_query, way]``.

    Computed by broadcasting the difference (exact, and differentiable at zero distance, unlike
    ``cdist``).
    """
    return -(query_feats[:, None, :] - protos[None, :, :]).pow(2).sum(-1)


class ProtoNet(Learner):
    """Prototypical network over ``model.forward_features``; see the module docstring."""

    name = "protonet"
    adapt_prefixes = ()

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        if self._features_net is None:
            raise TypeError(f"ProtoNet needs a model with forward_features; {type(model).__name__} has none")

    def adapted_names(self, params: Mapping[str, Tensor]) -> list[str]:
        return []

    def adapt(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, t: Tensor | None = None,
              steps: int | None = None, create_graph: bool = False) -> Params:
        """No inner loop: the parameters are returned unchanged."""
        return dict(params)

    def logits(self, params: Mapping[str, Tensor], x_support: Tensor, y_support: Tensor,
               x_query: Tensor, way: int | None = None) -> Tensor:
        if self.joint_bn:
            feats = self.features(params, torch.cat([x_support, x_query]))
            f_s, f_q = feats[:len(x_support)], feats[len(x_support):]
        else:
            f_s, f_q = self.features(params, x_support), self.features(params, x_query)
        if self.metric == "cosine":
            return cosine_logits(f_q, f_s, y_support, way, self.metric_scale)
        return proto_logits(f_q, prototypes(f_s, y_support, way))

    def task_loss(self, params: Mapping[str, Tensor], task: Task) -> Tensor:
        """A teacher's task through the prototypes (``distill_via=learner``): KD + CE on the query with
        the support's prototypes; ``distill_via=head``: the unused linear head, as before."""
        if self.distill_via == "head":
            return self.whole_task_loss(params, task)
        logits = self.logits(params, task.x_support, task.y_support, task.x_query, task.way)
        return self.task_loss_fn(logits, task.y_query, task.t_query)

    def outer_loss(self, params: Mapping[str, Tensor], task: Task, create_graph: bool = True) -> Tensor:
        if self.distill_via == "head":
            return F.cross_entropy(self.forward(params, task.x_query), task.y_query)
        return F.cross_entropy(self.logits(params, task.x_support, task.y_support, task.x_query), task.y_query)

    def meta_grads(self, params: Mapping[str, Tensor], task: Task) -> tuple[Params, dict]:
        """Gradient of the prototype loss on the query for one task (mean over the meta-batch is the
        caller's job). The head receives a zero gradient (unused)."""
        leaves = self._leaves(params)
        with torch.enable_grad():
            logits = self.logits(leaves, task.x_support, task.y_support, task.x_query, task.way)
            loss = self.task_loss_fn(logits, task.y_query, task.t_query)
            names = list(leaves)
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        out = {n: (torch.zeros_like(leaves[n]) if g is None else g.detach()) for n, g in zip(names, grads)}
        return out, {"loss": float(loss.detach()), "acc": accuracy_of(logits.detach(), task.y_query)}

    def predict(self, params: Mapping[str, Tensor], x_support: Tensor, y_support: Tensor,
                x_query: Tensor, steps: int | None = None) -> Tensor:
        """Query logits from the support prototypes (``steps`` is ignored: no fine-tuning)."""
        with torch.no_grad():
            base = {n: v.detach() for n, v in params.items()}
            return self.logits(base, x_support, y_support, x_query)
