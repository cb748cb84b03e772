"""Reptile (Nichol et al. 2018).

For one task, run ``inner_steps`` SGD steps at ``inner_lr`` on the support loss (all parameters,
detached: no graph), giving ``θ'``. The "meta-gradient" returned is the **unscaled difference**

    g = θ - θ'

so an outer SGD step with learning rate ε moves ``θ ← θ - ε·g = θ + ε(θ' - θ)``, i.e. ε of the way
toward the adapted parameters (ε = 1 jumps to θ'); Adam only uses its direction per coordinate.
Averaging ``g`` over tasks (the caller's job, a mean) gives batched Reptile. FREE's alignment step
uses the same quantity scaled by a constant (``θ.grad = 67·(θ - θf)``); scale it in the caller.

Only the support is used for the inner loop, so the query stays held out: the reported loss and
accuracy are the query's after adaptation (computed without a graph). Test-time prediction is the
MAML one: ``test_inner_steps`` SGD steps on the support, then the query.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .base import Learner, Params, Task, accuracy_of


class Reptile(Learner):
    name = "reptile"

    def adapted_params(self, params: Mapping[str, Tensor], task: Task) -> Params:
        """θ' after ``inner_steps`` detached SGD steps on the task's support."""
        base = {n: v.detach() for n, v in params.items()}
        return self._inner_loop(base, self.adapted_names(base),
                                lambda p: self.task_loss_fn(self.forward(p, task.x_support), task.y_support,
                                                            task.t_support),
                                self.inner_steps, create_graph=False, track=False)

    def meta_grads(self, params: Mapping[str, Tensor], task: Task) -> tuple[Params, dict]:
        """``θ - θ'`` for one task (see the module docstring) and the query loss/accuracy at θ'."""
        fast = self.adapted_params(params, task)
        grads = {n: (v.detach() - fast[n]) for n, v in params.items()}
        with torch.no_grad():
            logits = self.forward(fast, task.x_query)
            loss = self.task_loss_fn(logits, task.y_query, task.t_query)
        return grads, {"loss": float(loss), "acc": accuracy_of(logits, task.y_query)}
