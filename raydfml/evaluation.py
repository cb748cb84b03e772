"""The meta-test protocol and its baselines.

Protocol (DESIGN.md "Evaluation protocol"; fixes bug B7 of the seeds): select models on
**meta_val**, then report **one** seeded meta-test of N-way K-shot Q-query tasks as mean accuracy
± 95% CI. The task set is a pure function of ``(split, way, shot, query, tasks, seed)``: episode
``i`` is ``EpisodeSampler(split, way, shot, query, seed).episode(i)``, so every model evaluated
with the same arguments (the method and each baseline) is scored on the very same tasks. Meta-val
model selection uses the same :func:`evaluate` on the ``meta_val`` split with fewer tasks.

Each task runs with torch seeded to ``seed * 100003 + i`` inside a forked RNG state, so a
task's result does not depend on what ran before it, and evaluating does not disturb the caller's
global RNG stream (a run that evaluates more often trains identically).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data.episodes import EpisodeSampler
from .data.transforms import normalize

__all__ = ["EvalResult", "summarize", "evaluate", "evaluate_many", "teacher_average", "task_seed"]

# Seed of task i is seed * TASK_SEED_STRIDE + i (a prime stride keeps seeds' task streams apart).
TASK_SEED_STRIDE = 100003


@dataclass
class EvalResult:
    """Accuracy of one model on one fixed task set.

    ``accuracy`` is the mean per-task query accuracy in percent; ``ci95`` the half-width of the 95%
    confidence interval in percent, ``1.96 * std / sqrt(tasks)`` with the **sample** standard
    deviation (``ddof=1``) of the per-task accuracies (0 for a single task). ``per_task`` holds the
    per-task accuracies (percent) when kept.
    """

    way: int
    shot: int
    tasks: int
    accuracy: float
    ci95: float
    per_task: list[float] | None = None

    def record(self) -> dict:
        """The JSON record: ``{"way", "shot", "tasks", "accuracy", "ci95"}`` (no per-task list)."""
        return {"way": int(self.way), "shot": int(self.shot), "tasks": int(self.tasks),
                "accuracy": float(self.accuracy), "ci95": float(self.ci95)}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "EvalResult":
        return cls(int(rec["way"]), int(rec["shot"]), int(rec["tasks"]), float(rec["accuracy"]),
                   float(rec["ci95"]), rec.get("per_task"))

    @property
    def setting(self) -> str:
        """``"5-way 1-shot"``: the column name used in results tables."""
        return f"{self.way}-way {self.shot}-shot"

    def __str__(self) -> str:
        return f"{self.accuracy:.1f} ± {self.ci95:.1f}"


def summarize(per_task: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(mean, ci95)`` of per-task accuracies: ``1.96 * std(ddof=1) / sqrt(n)``; ci 0 when n == 1."""
    a = np.asarray(per_task, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no tasks to summarize")
    ci = 1.96 * a.std(ddof=1) / math.sqrt(a.size) if a.size > 1 else 0.0
    return float(a.mean()), float(ci)


def task_seed(seed: int, index: int) -> int:
    """The torch seed set before task ``index`` of an evaluation with ``seed``."""
    return (int(seed) * TASK_SEED_STRIDE + int(index)) % (2 ** 63)  # torch seeds are signed 64-bit


def _seed_task(s: int, device: torch.device) -> None:
    # On CPU seed only the CPU generator: torch.manual_seed also queues a (slow) lazy CUDA seeding.
    if device.type == "cpu":
        torch.default_generator.manual_seed(s)
    else:
        torch.manual_seed(s)


def _to_device(params: Any, device: torch.device) -> Any:
    """Move a (possibly nested) mapping/sequence of tensors to ``device``; other objects pass through."""
    if isinstance(params, torch.Tensor):
        return params.to(device)
    if isinstance(params, Mapping):
        return {k: _to_device(v, device) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return type(params)(_to_device(v, device) for v in params)
    return params


def evaluate(learner, params, split, *, way: int = 5, shot: int = 1, query: int = 15, tasks: int = 600,
             seed: int = 0, device="cpu", steps: int | None = None, progress: bool = False,
             desc: str | None = None, keep_per_task: bool = True) -> EvalResult:
    """Meta-test ``learner`` with ``params`` on ``tasks`` fixed ``way``-way ``shot``-shot tasks of ``split``.

    For each task the learner adapts on the support (its test-time inner steps, or ``steps``) and
    predicts the query: ``learner.predict(params, x_support, y_support, x_query, steps=steps)``.
    Images are normalised on ``device`` with ``split.spec``. Same arguments ⇒ same tasks and, for a
    deterministic learner, the same result, whatever ran before.
    """
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    device = torch.device(device)
    sampler = EpisodeSampler(split, way=way, shot=shot, query=query, seed=seed)
    params = _to_device(params, device)

    accs = np.empty(tasks, dtype=np.float64)
    fork_devices = [device] if device.type == "cuda" else []
    bar = tqdm(range(tasks), desc=desc or f"{way}-way {shot}-shot", disable=not progress, leave=False,
               dynamic_ncols=True)
    with torch.random.fork_rng(devices=fork_devices):
        for i in bar:
            _seed_task(task_seed(seed, i), device)
            ep = sampler.episode(i)
            xs = normalize(ep.support, split.spec, device)
            xq = normalize(ep.query, split.spec, device)
            ys = ep.support_labels.to(device)
            yq = ep.query_labels.to(device)
            with torch.enable_grad():     # inner-loop adaptation needs autograd even if the caller disabled it
                logits = learner.predict(params, xs, ys, xq, steps=steps)
            with torch.no_grad():
                accs[i] = 100.0 * (logits.detach().argmax(dim=-1) == yq).float().mean().item()
            if progress and (i % 20 == 0 or i == tasks - 1):
                bar.set_postfix(acc=f"{accs[:i + 1].mean():.1f}")
    bar.close()
    mean, ci = summarize(accs)
    return EvalResult(way, shot, tasks, mean, ci, accs.tolist() if keep_per_task else None)


def evaluate_many(models: Mapping[str, tuple[Any, Any]], split, *, shots: Sequence[int] = (1, 5), way: int = 5,
                  query: int = 15, tasks: int = 600, seed: int = 0, device="cpu", steps: int | None = None,
                  progress: bool = False, keep_per_task: bool = False) -> dict[str, list[EvalResult]]:
    """``{name: [EvalResult per shot]}`` for ``{name: (learner, params)}``; all models see the same tasks."""
    out: dict[str, list[EvalResult]] = {}
    for name, (learner, params) in models.items():
        out[name] = [evaluate(learner, params, split, way=way, shot=s, query=query, tasks=tasks, seed=seed,
                              device=device, steps=steps, progress=progress,
                              desc=f"{name} {way}-way {s}-shot", keep_per_task=keep_per_task)
                     for s in shots]
    return out


def teacher_average(state_dicts: Sequence[Mapping[str, torch.Tensor]], model: nn.Module) -> dict[str, torch.Tensor]:
    """FedAvg of teacher weights into the meta-model's parameters (PURER's ``--average`` baseline).

    Returns ``{name: mean over teachers}`` for every **parameter** of ``model`` (buffers such as BN
    running statistics are not averaged), on the parameter's device and dtype. Raises ``ValueError``
    when there are no teachers, or a teacher lacks a parameter or has it with another shape (callers
    report "teacher averaging unavailable: architectures differ").
    """
    if not state_dicts:
        raise ValueError("teacher averaging needs at least one teacher")
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        acc = None
        for t, sd in enumerate(state_dicts):
            if name not in sd:
                raise ValueError(f"teacher {t} has no parameter {name!r}")
            w = sd[name]
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(f"teacher {t} parameter {name!r} has shape {tuple(w.shape)}, "
                                 f"the meta-model's is {tuple(p.shape)}")
            w = w.detach().to(device="cpu", dtype=torch.float64)
            acc = w.clone() if acc is None else acc.add_(w)
        out[name] = (acc / len(state_dicts)).to(device=p.device, dtype=p.dtype)
    return out
