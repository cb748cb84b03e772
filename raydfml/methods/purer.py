"""``purer``: PURER's one learnable synthetic dataset, inverted from all teachers, with the episode
curriculum and its adversarial hardening step (ECI).

Per round: the MetaLearner hands each drawn teacher the current images of its classes; the teacher's
TeacherPool actor returns the gradient of its DeepInversion loss (CE + BN statistics + TV + L2)
w.r.t. those rows; the MetaLearner sums them per class and takes one Adam step of the dataset, adding
the hardening term when the curriculum switched it on. Replay draws its tasks from the dataset (not
from a bank), and the replay accuracy drives the curriculum. There is no per-teacher meta-gradient.

Fixes against the seeds are listed in :mod:`raydfml.synthesis.purer`; in addition the loss weights
are options here (``purer.bn_weight`` ...) instead of constants.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..data.augment import augment, check_augment
from ..errors import UserError
from ..records import TeacherRecord
from ..synthesis.purer import PurerDataset, purer_teacher_loss
from ..utils import task_seed
from .base import Method
from .registry import register_method


@dataclass
class PurerConfig:
    """PURER's options (``--set purer.<option>=...``); the seeds' values by default."""
    lr: float = 0.25                  # Adam lr of the synthetic dataset
    adv_start: int = 4000             # round at which the hardening curriculum first fires
    patience: int = 6                 # then: rounds without a new best replay accuracy before it fires again
    adv_scale: float = 10.0           # weight of the hardening term
    bn_weight: float = 0.01           # per-teacher inversion loss: BN-statistics prior ...
    tv_weight: float = 1e-4           # ... total variation ...
    l2_weight: float = 1e-5           # ... and L2 of the normalised images
    augment: str = "shift"            # augmentation of the rows inside the teachers' loss
    data_steps: int = 1               # Adam steps of the dataset per round, each from fresh teacher gradients
                                      # (the seeds: 1 per meta-iteration, from 13 teachers, 60000 iterations)


@register_method("purer")
class Purer(Method):
    Config = PurerConfig
    preset = {"synth.name": "pixel", "synth.per_class": 20, "train.kd_steps": 0}
    # paper: PURER's scripts: 240000 episodes in meta-batches of 4, i.e. 60000 meta-iterations, each one
    # Adam step of the dataset from 13 teachers and one meta-batch; the hardening fires at iteration 4000
    # (so well inside the run) and then on the patience rule; test every 500 iterations.
    profiles = {"smoke": {"purer.adv_start": 2, "purer.patience": 2},
                # quick: 5 Adam steps of the dataset per round from 6 teachers (the seeds: 1 from 13, over
                # 60000 iterations): the teachers' agreement on their rows rose from 0.35 to 0.83 and
                # meta-test from 28.5 / 37.3 to 31.6 / 43.4 on ma; 15 steps made it worse (28.9 / 39.0).
                # quick: a TV prior 100x the seeds' (1e-2): smoother rows that teach more; ma seeds 0/1/2 at 1e-4
                # 31.5 / 43.0, 35.2 / 48.0, 32.4 / 45.0, at 1e-2 33.4 / 47.9, 38.7 / 57.1, 38.2 / 55.3 (seed 0 at
                # 1e-3 / 3e-2 / 1e-1: 31.7 / 44.2, 31.7 / 44.4, 31.2 / 42.5; docs/fidelity.md).
                # quick: no BN-statistics prior (purer.bn_weight 0; the seeds' 0.01), as the generator methods:
                # ma seeds 0-4, 300 tasks, 33.4 / 47.9, 38.7 / 57.1, 38.2 / 55.3, 36.4 / 52.5, 33.4 / 47.8 at 0.01
                # against 33.8 / 50.1, 39.4 / 57.7, 37.9 / 55.4, 37.1 / 54.8, 33.6 / 48.4 at 0 (higher at 5 shots at
                # every seed; 0.1 at seed 0: 30.8 / 42.4, 0.001: 33.3 / 49.5).
                "quick": {"purer.adv_start": 6, "purer.patience": 6, "purer.data_steps": 5,
                          "train.teachers_per_round": 6, "purer.tv_weight": 1e-2, "purer.bn_weight": 0.0},
                "paper": {"train.rounds": 60000, "train.replay_batches": 1, "train.teachers_per_round": 13,
                          "train.eval_every": 500, "purer.adv_start": 4000}}

    @classmethod
    def validate(cls, cfg) -> None:
        o = cfg.section("purer")
        if cfg.aggregate.rule != "mean" or cfg.train.kd_steps > 0:
            raise UserError("method purer makes no per-teacher meta-gradient step: keep aggregate.rule=mean "
                            "and train.kd_steps=0")
        if o.data_steps < 1:
            raise UserError(f"config purer.data_steps={o.data_steps}: must be at least 1")
        if not o.lr > 0 or o.patience < 1 or o.adv_scale < 0:
            raise UserError(f"config purer: lr must be > 0, patience >= 1 and adv_scale >= 0 (got lr={o.lr}, "
                            f"patience={o.patience}, adv_scale={o.adv_scale})")
        for key in ("bn_weight", "tv_weight", "l2_weight"):         # as synth.*_weight (config.validate)
            if not getattr(o, key) >= 0:
                raise UserError(f"config purer.{key}={getattr(o, key)}: a loss weight must be 0 or more")
        check_augment(o.augment)
        lc = cfg.learner
        if lc.train_shot + lc.train_query > cfg.synth.per_class:
            raise UserError(f"config synth.per_class={cfg.synth.per_class}: PURER draws {lc.train_shot} support + "
                            f"{lc.train_query} query images per class from it (learner.train_shot/train_query)")

    def loss_config(self) -> dict:
        o = self.options
        return {"bn_weight": o.bn_weight, "tv_weight": o.tv_weight, "l2_weight": o.l2_weight, "augment": o.augment}

    # --- driver -----------------------------------------------------------------------------------
    def run_round(self, rnd):
        t0 = time.perf_counter()
        teachers = rnd.draw_teachers()
        classes = {t: rnd.entries[t].global_classes for t in teachers}
        last = self.options.data_steps - 1
        for step in range(self.options.data_steps):      # the hardening term (when due) joins the first step
            rows = rnd.on_meta("rows", classes)
            # Only in a round the driver logs do the teachers send their rows back (with their own labels):
            # otherwise the images would cross the object store twice per step for nothing.
            with_images = rnd.log_images and step == last
            batch = rnd.on_teachers("row_grads", teachers, step, with_images, per_teacher=rows)
            rnd.metrics.update(rnd.on_meta("step", records=batch))
        rnd.metrics["time/synthesis_s"] = time.perf_counter() - t0
        # The last step's batch: its summaries give the round's teacher counts and accuracies (per
        # architecture and per teacher, as for every method); in a logged round its records hold the rows
        # for the galleries. PURER's images are shared, not per teacher: a class's rows are one slice of the
        # central dataset, optimised against every drawn teacher that knows the class (their gradients are
        # summed), round after round. So gallery/round<r>_teacher<t>.png shows the rows of teacher t's
        # classes as t received them in the round's last data step (before that step's Adam update),
        # captioned with t's own label and confidence; a teacher sharing a class gets its own PNG of the
        # same rows with its own captions.
        return batch

    # --- TeacherPool ------------------------------------------------------------------------------
    def teacher_row_grads(self, pool, round_idx: int, tid: int, rows, step: int = 0,
                          with_images: bool = False) -> TeacherRecord:
        """The teacher's inversion loss on its classes' current rows and its gradient w.r.t. them; with
        ``with_images`` also the rows themselves with the teacher's own label and confidence for each."""
        classes, spec = pool.classes_of(tid), pool.spec_of(tid)
        keys = (self.cfg.seed, round_idx, tid, 1) if step == 0 else (self.cfg.seed, round_idx, tid, 1, step)
        rec = purer_teacher_loss(pool.teacher(tid), classes, torch.from_numpy(np.asarray(rows).copy()).to(pool.device),
                                 spec.mean, spec.std, seed=task_seed(*keys), **self.loss_config())
        if with_images:             # labels: each row's class in the teacher's head; predicted: its argmax
            record = pool.record(tid, rec)
        else:
            record = TeacherRecord(teacher=tid, arch=pool.arch_of(tid), classes=classes, inv_loss=rec.loss,
                                   teacher_acc=rec.teacher_acc, seconds=rec.seconds)
        # The teacher's passes so far this round (one per data step): the last step's records sum to the
        # round's total, which is what the driver reports as synth/passes.
        record.passes = step + 1
        record.state_grad = rec.state_grad["rows"].detach().cpu().numpy()
        return record

    # --- MetaLearner ------------------------------------------------------------------------------
    def init_central(self, ml) -> None:
        """One learnable set of rows per global class the pool's teachers know."""
        o = self.options
        self.dataset = PurerDataset(classes=sorted(set(ml.pool_classes)), per_class=self.cfg.synth.per_class,
                                    image_size=ml.image_size, lr=o.lr, bn_weight=o.bn_weight, tv_weight=o.tv_weight,
                                    l2_weight=o.l2_weight, adv_start=o.adv_start, patience=o.patience,
                                    adv_scale=o.adv_scale, augment=o.augment, seed=self.cfg.seed)
        self.adv_next = False           # the curriculum: harden the next round?

    def central_rows(self, ml, round_idx: int, records, teacher_classes: dict[int, tuple[int, ...]]) -> dict:
        """The current images of each teacher's classes (what its TeacherPool actor inverts against)."""
        return {t: self.dataset.rows_for(c).cpu().numpy() for t, c in teacher_classes.items()}

    def central_step(self, ml, round_idx: int, records) -> dict:
        """One Adam step of the dataset from the teachers' row gradients (summed per class), plus the
        hardening term when the curriculum switched it on."""
        pairs = [(rec.classes, torch.from_numpy(np.asarray(rec.state_grad))) for rec in records]
        adversarial = self.adv_next
        stats = self.dataset.step(pairs, (lambda images: self._adversarial_loss(ml, images)) if adversarial else None)
        self.adv_next = False
        out = {"synth/inv_loss": float(np.mean([r.inv_loss for r in records])),
               "synth/teacher_acc": float(np.mean([r.teacher_acc for r in records])),
               "purer/adversarial": float(adversarial), "purer/grad_norm": stats["grad_norm"]}
        if stats["adv_loss"] is not None:
            out["purer/adv_loss"] = stats["adv_loss"]
        return out

    def _adversarial_loss(self, ml, images: torch.Tensor) -> torch.Tensor:
        """Minus the meta-model's outer query loss on a task drawn from the (non-detached) images:
        maximising it makes the synthetic tasks harder for the current meta-model (PURER's ECI)."""
        lc, t = self.cfg.learner, self.cfg.train
        x_s, y_s, x_q, y_q, classes = self.dataset.sample_task(self.cfg.episode_way, lc.train_shot, lc.train_query,
                                                               ml.aug_gen, images=images)
        from ..learners import Task

        x_s = ml.normalize(augment(x_s, t.augment, ml.aug_gen), y_s, classes).to(ml.device)
        x_q = ml.normalize(augment(x_q, t.augment, ml.aug_gen), y_q, classes).to(ml.device)
        params = {n: p.detach() for n, p in ml.params.items()}
        # The learner's own meta-objective (ProtoNet: the prototypes; with learner.distill_via=head the
        # linear head, which ProtoNet never trains, so the hardening pushes in an arbitrary direction).
        return -ml.learner.outer_loss(params, Task(x_s, y_s.to(ml.device), x_q, y_q.to(ml.device)), create_graph=True)

    def sample_task(self, ml):
        lc = self.cfg.learner
        return self.dataset.sample_task(self.cfg.episode_way, lc.train_shot, lc.train_query, ml.aug_gen)

    def after_replay(self, ml, round_idx: int, accuracies: list[float]) -> None:
        if accuracies:      # the curriculum watches the pseudo-task training accuracy (the seeds' switch rule)
            self.adv_next = self.dataset.curriculum(round_idx, float(np.mean(accuracies)))

    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict(), "adv_next": self.adv_next}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        for group in self.dataset.optimizer.param_groups:     # this run's lr, not the checkpoint's
            group["lr"] = self.options.lr
        self.adv_next = bool(state["adv_next"])


__all__ = ["Purer", "PurerConfig"]
