"""PURER's learnable synthetic dataset with its episode curriculum (ECI).

There is no generator: the central state is one learnable image tensor, ``per_class`` rows for each
global class (S+Q in PURER-Plus), optimised by Adam with one step per meta-iteration from

- the DeepInversion loss of every teacher sampled this round on its own classes' rows
  (CE + BN statistics + TV + L2), computed where the teacher lives (a TeacherPool actor runs
  ``purer_teacher_loss``; only rows and their gradient cross the object store), and
- when the curriculum says so, an adversarial "hardening" term: ``adv_scale`` times a closure that
  returns minus the meta-model's outer query loss on a task sampled from the (non-detached) images.

Fixes against the seeds (reference/purer.md §7):

- §7.1: the teachers' losses were accumulated as prefix sums (teacher k weighted K-k); here the
  per-teacher gradients are summed.
- §7.3: PURER-Plus paired rows in ascending class order with targets in the teacher's unsorted class
  order; here each row's *global* class is mapped to its position in the teacher's head.
- §7.12: the seeds' pixels were unconstrained (never clamped); here they are ``sigmoid(logits)``,
  always in [0, 1] pixel space, and normalised with the dataset's statistics for the teacher.
  The jitter is per image (``augment="shift"``), not one roll for the whole batch.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import augment as apply_augment, check_augment
from ..errors import UserError
from .base import (BNStatsLoss, Recovered, cpu_generator, frozen, make_normalizer, module_device,
                   relative_targets, total_variation)


def purer_teacher_loss(teacher: nn.Module, teacher_classes: Sequence[int], rows: Tensor, mean: Sequence[float],
                       std: Sequence[float], seed: int, *, bn_weight: float = 0.01, tv_weight: float = 1e-4,
                       l2_weight: float = 1e-5, augment: str = "shift",
                       row_classes: Sequence[int] | None = None, ce_weight: float = 1.0) -> Recovered:
    """One teacher's DeepInversion loss on its rows and the gradient w.r.t. those rows.

    ``rows`` are [0, 1] images; by default ``len(teacher_classes)`` equal blocks in the order of
    ``teacher_classes`` (what ``PurerDataset.rows_for`` returns); ``row_classes`` names each row's
    global class otherwise. The CE target of a row is its class's position in ``teacher_classes``
    (the teacher's head order). Runs on the teacher's device; the gradient comes back float32 on
    ``rows``' device as ``state_grad["rows"]``, and the images as float16 on the CPU.

    Loss = CE(T(norm(aug(x))), t) + bn_weight * BNStats + tv_weight * TV(norm(x)) + l2_weight * ||norm(x)||,
    the seeds' terms and weights (TV and L2 on the normalised, un-augmented images, as unsquared norms).
    """
    t0 = time.perf_counter()
    teacher_classes = tuple(int(c) for c in teacher_classes)
    if row_classes is None:
        if rows.shape[0] % len(teacher_classes):
            raise ValueError(f"{rows.shape[0]} rows do not split into {len(teacher_classes)} equal class blocks")
        per = rows.shape[0] // len(teacher_classes)
        row_classes = [c for c in teacher_classes for _ in range(per)]
    device = module_device(teacher)
    targets = relative_targets(teacher_classes, row_classes).to(device)
    normalize = make_normalizer(mean, std, device)
    x = rows.detach().to(device, torch.float32).requires_grad_(True)
    # No BN hooks at weight 0 (PURER's quick profile), as FREE's recovery: they would record statistics of
    # every forward pass for a term that is multiplied by zero.
    with frozen(teacher), (BNStatsLoss(teacher) if bn_weight else contextlib.nullcontext()) as bn:
        logits = teacher(normalize(apply_augment(x, augment, cpu_generator(seed))))
        xn = normalize(x)
        bn_term = bn_weight * bn.loss() if bn_weight else 0.0
        loss = (ce_weight * F.cross_entropy(logits, targets) + bn_term
                + tv_weight * total_variation(xn) + l2_weight * torch.linalg.vector_norm(xn))
        grad, = torch.autograd.grad(loss, x)
        with torch.no_grad():
            acc = float((teacher(xn).argmax(1) == targets).float().mean())
    return Recovered(images=x.detach().clamp(0, 1).to("cpu", torch.float16), labels=targets.cpu(),
                     classes=teacher_classes, teacher_acc=acc, loss=float(loss.detach()), passes=1,
                     seconds=time.perf_counter() - t0, state_grad={"rows": grad.to(rows.device)})


class PurerDataset:
    """The central learnable dataset: ``per_class`` images for each of ``classes`` (global ids).

    Hyperparameters are the seeds' (data Adam lr 0.25, BN 0.01, TV 1e-4, L2 1e-5, hardening from
    meta-iteration 4000 with patience 6 and scale 10). Pixels are ``sigmoid`` of an unconstrained
    tensor initialised ``randn`` from ``seed`` (the seeds: ``randn`` in normalised space, unclamped).

    lr 0.25 carries over to the logit parametrisation: on a glyph conv4 teacher (100 rows, one CPU
    thread, ~0.35-0.4 s per step) the teacher's accuracy on its rows after 1/5/10/20 steps was
    0.44 / 0.96 / 1.00 / 1.00 with ``shift`` (0.33 / 0.55 / 0.85 / 1.00 with ``colour``); lr 0.05 was
    slower (0.60 at 5 steps), lr 1.0 no faster and its loss stalled around 3 (vs 0.4 at 0.25).
    """

    def __init__(self, classes: Sequence[int], per_class: int, image_size: int, lr: float = 0.25,
                 bn_weight: float = 0.01, tv_weight: float = 1e-4, l2_weight: float = 1e-5, adv_start: int = 4000,
                 patience: int = 6, adv_scale: float = 10.0, augment: str = "shift", seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.classes = tuple(int(c) for c in classes)
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise UserError(f"PurerDataset needs distinct class ids, got {self.classes}")
        if per_class < 1:
            raise UserError(f"per_class must be at least 1, got {per_class}")
        self.per_class, self.image_size = per_class, image_size
        self.bn_weight, self.tv_weight, self.l2_weight = bn_weight, tv_weight, l2_weight
        self.adv_start, self.patience, self.adv_scale = adv_start, patience, adv_scale
        self.augment = check_augment(augment)
        self._index = {c: i for i, c in enumerate(self.classes)}
        shape = (len(self.classes), per_class, 3, image_size, image_size)
        self.logits = torch.randn(shape, generator=cpu_generator(seed)).to(device).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.logits], lr=lr)
        self._best: float | None = None     # curriculum: best train accuracy since the last switch
        self._stall = 0                     # curriculum: rounds without a new best

    # --- reading the images ---------------------------------------------------------------------
    def images(self) -> Tensor:
        """All current images ``[C, per_class, 3, S, S]`` in [0, 1], detached."""
        return torch.sigmoid(self.logits.detach())

    def _positions(self, classes: Sequence[int]) -> list[int]:
        try:
            return [self._index[int(c)] for c in classes]
        except KeyError as exc:
            raise ValueError(f"class {exc.args[0]} is not in this synthetic dataset") from None

    def rows_for(self, teacher_classes: Sequence[int]) -> Tensor:
        """The current images of ``teacher_classes``, in that order, ``per_class`` each: [n, 3, S, S]."""
        idx = torch.tensor(self._positions(teacher_classes), device=self.logits.device)
        return self.images()[idx].flatten(0, 1)

    # --- the teacher side ---------------------------------------------------------------------------
    def loss_config(self) -> dict:
        """Keyword arguments of ``purer_teacher_loss`` (to ship to a TeacherPool actor)."""
        return {"bn_weight": self.bn_weight, "tv_weight": self.tv_weight, "l2_weight": self.l2_weight,
                "augment": self.augment}

    def teacher_loss_and_grad(self, teacher: nn.Module, teacher_classes: Sequence[int], rows: Tensor,
                              mean: Sequence[float], std: Sequence[float], seed: int) -> tuple[float, Tensor]:
        """One teacher's inversion loss on its rows and the gradient w.r.t. the rows (see
        ``purer_teacher_loss``, which an actor can call without holding the central tensor)."""
        rec = purer_teacher_loss(teacher, teacher_classes, rows, mean, std, seed, **self.loss_config())
        return rec.loss, rec.state_grad["rows"]

    # --- the central update ------------------------------------------------------------------------
    def pixel_grad(self, teacher_grads: Sequence[tuple[Sequence[int], Tensor]]) -> Tensor:
        """Sum of the teachers' row gradients, scattered to their classes: [C, per_class, 3, S, S].

        Teachers that share a class add up on its rows (a plain sum; the seeds' prefix sum weighted
        teacher k by K-k: bug §7.1).
        """
        total = torch.zeros_like(self.logits, requires_grad=False)
        for classes, grad in teacher_grads:
            idx = torch.tensor(self._positions(classes), device=total.device)
            total.index_add_(0, idx, grad.to(total.device, total.dtype).view(len(idx), *total.shape[1:]))
        return total

    def step(self, teacher_grads: Sequence[tuple[Sequence[int], Tensor]],
             adversarial_loss: Callable[[Tensor], Tensor] | None = None) -> dict:
        """One Adam step of the dataset.

        ``teacher_grads`` are (teacher classes, gradient w.r.t. ``rows_for(classes)``) pairs, computed
        at the current images. ``adversarial_loss(images)`` receives the non-detached images
        ``[C, per_class, 3, S, S]`` (sample a task from them with ``sample_task(..., images=...)``) and
        returns minus the meta-model's outer query loss; ``adv_scale`` times its gradient is added.
        """
        pixel_grad = self.pixel_grad(teacher_grads)
        self.optimizer.zero_grad(set_to_none=True)
        images = torch.sigmoid(self.logits)
        # <images, pixel_grad> has gradient pixel_grad * sigmoid'(logits) w.r.t. the logits: the
        # teachers' gradient chained through the parametrisation, without recomputing their losses.
        objective = (images * pixel_grad).sum()
        adv = None
        if adversarial_loss is not None:
            adv_term = adversarial_loss(images)
            objective = objective + self.adv_scale * adv_term
            adv = float(adv_term.detach())
        objective.backward()
        grad_norm = float(torch.linalg.vector_norm(self.logits.grad))
        self.optimizer.step()
        return {"teachers": len(teacher_grads), "pixel_grad_norm": float(torch.linalg.vector_norm(pixel_grad)),
                "grad_norm": grad_norm, "adversarial": adversarial_loss is not None, "adv_loss": adv}

    # --- the episode curriculum ------------------------------------------------------------------------
    def curriculum(self, round_idx: int, train_acc: float) -> bool:
        """Whether the *next* round adds the adversarial term (the seeds' switch, purer.md §2).

        Fires at ``round_idx == adv_start``; after that, whenever the pseudo-task training accuracy
        has set no new maximum for ``patience`` rounds (then the best is forgotten and counting restarts).
        """
        if round_idx == self.adv_start:
            return True
        if round_idx < self.adv_start:
            return False
        if self._best is None or train_acc > self._best:
            self._best, self._stall = train_acc, 0
            return False
        self._stall += 1
        if self._stall >= self.patience:
            self._best, self._stall = None, 0
            return True
        return False

    # --- tasks for the meta-learner ---------------------------------------------------------------------------
    def sample_task(self, way: int, shot: int, query: int, generator: torch.Generator,
                    images: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[int, ...]]:
        """A ``way``-way task across teachers: random classes, random disjoint support/query rows.

        Returns ``(x_s, y_s, x_q, y_q, classes)``: images in [0, 1] (``images`` if given, e.g. the
        non-detached tensor inside an adversarial closure, else the current detached ones), labels
        ``0..way-1`` in class blocks, and the global class of each label. Rows are re-drawn per task
        (PURER-Plus always used the first S as support: little task diversity, §7.13).
        """
        n_cls = len(self.classes)
        if way > n_cls or shot + query > self.per_class:
            raise UserError(f"a {way}-way {shot}-shot {query}-query task needs {way} classes and {shot + query} "
                            f"images per class; the synthetic dataset has {n_cls} and {self.per_class}")
        src = self.images() if images is None else images
        dev = generator.device
        cls = torch.randperm(n_cls, generator=generator, device=dev)[:way]
        rows = torch.rand(way, self.per_class, generator=generator, device=dev).argsort(1)[:, :shot + query]
        sel = src[cls.to(src.device).view(way, 1), rows.to(src.device)]          # [way, shot+query, 3, S, S]
        y_s = torch.arange(way, device=src.device).repeat_interleave(shot)
        y_q = torch.arange(way, device=src.device).repeat_interleave(query)
        return (sel[:, :shot].flatten(0, 1), y_s, sel[:, shot:].flatten(0, 1), y_q,
                tuple(self.classes[i] for i in cls.tolist()))

    # --- checkpointing --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # Deep copies: a state dict that aliases live tensors silently becomes the *latest* state
        # (the seeds' "best checkpoint" bug, purer.md §7.2).
        return {"classes": list(self.classes), "per_class": self.per_class, "image_size": self.image_size,
                "logits": self.logits.detach().cpu().clone(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "best": self._best, "stall": self._stall}

    def load_state_dict(self, state: dict) -> None:
        mine = (list(self.classes), self.per_class, self.image_size)
        theirs = (list(state["classes"]), state["per_class"], state["image_size"])
        if mine != theirs:
            raise UserError(f"synthetic-dataset checkpoint is for classes/per_class/image_size {theirs}, "
                            f"this run has {mine}")
        with torch.no_grad():
            self.logits.copy_(state["logits"].to(self.logits.device))
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self._best, self._stall = state["best"], state["stall"]


__all__ = ["PurerDataset", "purer_teacher_loss"]
