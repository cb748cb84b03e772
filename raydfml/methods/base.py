"""The method contract: the hooks the runtime calls, and the common per-teacher recovery method.

A ``Method`` subclass is instantiated once per role from the experiment's config (``Method(cfg)``):
on the driver, in every TeacherPool actor and in the MetaLearner. Each role calls only its own hooks,
so an instance keeps only that role's state.

Driver (``raydfml.runtime.driver``): ``run_round(rnd)`` is the round plan. ``rnd``
(:class:`raydfml.runtime.driver.Round`) offers ``draw_teachers()``, ``theta()`` (a handle of the
meta-parameters), ``on_teachers(hook, teachers, *shared, per_teacher=...)`` (runs
``teacher_<hook>`` on the TeacherPool actors; returns a ``TeacherBatch``: summaries here, full records
kept in the object store), ``on_meta(hook, *args, records=batch)`` (runs ``central_<hook>`` on the
MetaLearner with the batch's full records, passed by reference), ``bank(batch)`` (recovered images
into the task memory bank), ``aggregate(batch)`` (one meta-update with the configured rule, two
passes when the rule asks), ``rule``, ``metrics`` (the round's metrics dict) and ``log_images``
(True in the rounds whose images the driver logs: the first and every ``train.eval_every``). It
returns the batch of recovered images it wants logged (or ``None``): its summaries give the round's
recovery metrics, and in ``log_images`` rounds up to two of its records with images become TensorBoard
grids and ``gallery/`` PNGs captioned with the teacher's own labels (``TeacherRecord.predicted``/
``confidence``). Replay, meta-validation, checkpoints and logging follow generically.

TeacherPool (``raydfml.runtime.teacher_pool``): ``teacher_<hook>(pool, round_idx, teacher, payload,
*shared) -> TeacherRecord``, once per teacher; ``payload`` is that teacher's entry of ``per_teacher``.
``pool`` offers the teacher (``teacher(t)``, ``classes_of``, ``spec_of``, ``arch_of``), the
meta-model (``params(theta)``, ``learner``, ``meta_model``), ``synthesize(t, seed)`` with the
configured synthesizer, ``record(t, recovered)``, ``teacher_task(...)``, ``contribute(...)`` (the
per-teacher gradient or task an aggregation rule needs) and ``cache`` (cleared every round).
``api(t, output=..., input=...)`` is the teacher as a predict-only ``blackbox.BlackBoxAPI``; a method
with ``black_box = True`` (or a scenario with ``pool.black_box``) makes the pool black-box:
``teacher(t)`` and everything built on it refuse, so the method's hooks can only query APIs.

MetaLearner (``raydfml.runtime.meta_learner``): ``init_central(ml)`` builds the method's central
state; ``central_<hook>(ml, round_idx, records, *args)`` are its steps; ``sample_task(ml)`` draws a
replay task (default: the task memory bank); ``after_replay(ml, round_idx, accuracies)``;
``state_dict()``/``load_state_dict()`` put the central state into the run's checkpoint;
``report(ml)`` adds top-level fields to results.json (e.g. query totals).

Driver-side exits: a round plan that raises ``errors.RunStopped`` before doing anything (a budget
would be exceeded) stops the run after a checkpoint of the rounds so far; options listed in
``free_on_resume`` (budgets) may then change on ``--resume``.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

from ..errors import UserError
from ..records import TeacherRecord
from ..utils import task_seed


class Method:
    name: ClassVar[str] = ""                            # set by @register_method
    Config: ClassVar[type | None] = None                # the typed option section (--set <name>.<option>=...)
    preset: ClassVar[dict[str, Any]] = {}               # shared-section values (dotted keys) the method sets
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}  # per profile (smoke/quick/paper): more dotted values
    scenarios: ClassVar[tuple[str, ...] | None] = None  # scenarios it runs in (None: every one)
    two_pass_rules: ClassVar[bool] = True               # whether its teachers can redo a task for a second pass
    free_on_resume: ClassVar[tuple[str, ...]] = ()      # its options (dotted) that only limit a run (a query
                                                        # budget): --resume may change them, the run dir keeps its name
    black_box: ClassVar[bool] = False                   # True: learns through prediction APIs only (pool.api),
                                                        # so the TeacherPool refuses white-box access (pool.teacher)

    def __init__(self, cfg):
        self.cfg = cfg
        self.options = cfg.sections.get(self.name) if self.Config is not None else None

    @classmethod
    def validate(cls, cfg) -> None:
        """Raise ``UserError`` for a config the method cannot run (after the shared checks)."""
        if cfg.train.kd_steps < 1 and cfg.aggregate.rule != "mean":
            raise UserError(f"config train.kd_steps=0: aggregate.rule={cfg.aggregate.rule} needs the per-teacher "
                            "step (kd_steps >= 1)")

    # --- driver -----------------------------------------------------------------------------------
    def run_round(self, rnd):
        raise NotImplementedError(f"method {self.name!r} has no round plan (run_round)")

    # --- TeacherPool ------------------------------------------------------------------------------
    def teacher_hook(self, hook: str) -> Callable[..., TeacherRecord]:
        fn = getattr(self, f"teacher_{hook}", None)
        if fn is None:
            raise AttributeError(f"method {self.name!r} has no teacher hook teacher_{hook}")
        return fn

    def teacher_grad_at(self, pool, round_idx: int, tid: int, theta, needs: str) -> TeacherRecord:
        """The second pass of a two-pass rule: the teacher's gradient at its own state ``theta``, on the
        task this round's first pass built (rebuilt, identically, on a replacement actor)."""
        task = pool.cache.get(("task", tid))
        if task is None:
            task = pool.cache[("task", tid)] = self.rebuild_task(pool, round_idx, tid)
        record = TeacherRecord(teacher=tid, arch=pool.arch_of(tid), classes=pool.classes_of(tid))
        pool.gradient_into(record, task, theta, needs)
        return record

    def rebuild_task(self, pool, round_idx: int, tid: int):
        raise RuntimeError(f"method {self.name!r} cannot rebuild teacher {tid}'s task of round {round_idx}")

    # --- MetaLearner ------------------------------------------------------------------------------
    def init_central(self, ml) -> None:
        """Build the method's central state (called once in the MetaLearner's constructor)."""

    def central_hook(self, hook: str) -> Callable[..., Any]:
        fn = getattr(self, f"central_{hook}", None)
        if fn is None:
            raise AttributeError(f"method {self.name!r} has no central hook central_{hook}")
        return fn

    def sample_task(self, ml):
        """One replay task ``(x_s, y_s, x_q, y_q, classes)`` in [0, 1] pixels, or None when there is none."""
        lc = self.cfg.learner
        return ml.bank.sample_task(self.cfg.episode_way, lc.train_shot, lc.train_query, ml.rng)

    def after_replay(self, ml, round_idx: int, accuracies: list[float]) -> None:
        """Called after each round's replay with the replay tasks' training accuracies."""

    def report(self, ml) -> dict:
        """Extra top-level fields for results.json from the method's central state (e.g. query totals)."""
        return {}

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


class TeacherRecovery(Method):
    """Recover each teacher of the round with the configured per-teacher synthesizer (``synth.name``),
    put the images into the task memory bank and, when ``train.kd_steps > 0``, make one meta-update from
    the teachers' contributions with the configured aggregation rule (``aggregate.rule``).

    Subclasses change the preset and, where they choose teachers differently, ``round_teachers``.
    """

    def run_round(self, rnd):
        return self.recover_and_step(rnd, self.round_teachers(rnd))

    def round_teachers(self, rnd) -> list[int]:
        return rnd.draw_teachers()

    def recover_and_step(self, rnd, teachers: list[int]):
        needs = rnd.rule.needs if self.cfg.train.kd_steps > 0 else None
        theta = rnd.theta() if needs in ("meta_grad", "task_grad") else None
        with rnd.timed("time/synthesis_s"):
            batch = rnd.on_teachers("recover", teachers, theta, needs)
        rnd.bank(batch)
        if needs is not None:
            rnd.aggregate(batch)
        return batch

    def teacher_recover(self, pool, round_idx: int, tid: int, _payload, theta, needs: str | None) -> TeacherRecord:
        seed = task_seed(self.cfg.seed, round_idx, tid)
        rec = pool.synthesize(tid, seed)
        record = pool.record(tid, rec)
        if needs is not None:
            pool.contribute(record, tid, rec, seed, theta, needs)
        return record

    def rebuild_task(self, pool, round_idx: int, tid: int):
        seed = task_seed(self.cfg.seed, round_idx, tid)
        rec = pool.synthesize(tid, seed)
        return pool.teacher_task(tid, rec.images, rec.labels, seed)


__all__ = ["Method", "TeacherRecovery"]
