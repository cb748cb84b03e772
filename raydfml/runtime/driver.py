"""The driver: the round loop of one training run.

Each round, the method's round plan (``Method.run_round``) does its teacher-side and central work
through a :class:`Round`; then, for every method alike, the MetaLearner replays tasks, meta-validates
on schedule, the state is checkpointed (``resume`` loses at most the round in flight) and the round's
metrics are logged. The driver names no method: everything method-specific is behind the hooks.
Whole experiments (data, pool, evaluation, run directories) are :mod:`raydfml.experiment`'s.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..aggregation import build_rule
from ..config import ExperimentConfig
from ..errors import RunStopped, UserError
from ..faults import maybe_fail
from ..methods import create_method
from ..records import TeacherRecord, merge
from ..utils import atomic_path
from .executor import TeacherBatch
from .pool import round_teachers

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"
PREVIOUS = "checkpoints/previous.pt"    # the one before: what a resume falls back to if last.pt is torn


def save_checkpoint(run_dir: Path, round_idx: int, meta_state: dict) -> None:
    """Write the checkpoint (fsynced), keeping the previous one. Temporary files of a killed earlier
    writer are removed (one process writes a run directory: ``raydfml.rundir.RunLock``)."""
    last, previous = Path(run_dir) / CHECKPOINT, Path(run_dir) / PREVIOUS
    for stale in last.parent.glob(f".{last.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    with atomic_path(last.with_name("next.pt")) as tmp:
        torch.save({"round": round_idx, "meta": meta_state}, tmp)
    maybe_fail("mid_checkpoint", round_idx)
    if last.is_file():
        os.replace(last, previous)
    os.replace(last.with_name("next.pt"), last)


def _read(path: Path) -> dict | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return state if isinstance(state, dict) and "meta" in state and "round" in state else None


def load_checkpoint(run_dir: Path) -> dict:
    """The last checkpoint, or the previous one (said on stderr) when the last is missing or torn."""
    last, previous = Path(run_dir) / CHECKPOINT, Path(run_dir) / PREVIOUS
    for path in (last, last.with_name("next.pt"), previous):
        state = _read(path) if path.is_file() else None
        if state is not None:
            if path != last:
                print(f"{last} is missing or unreadable; resuming from {path} (round {state['round']})",
                      file=sys.stderr)
            return state
    if not last.is_file() and not previous.is_file():
        raise UserError(f"--resume: no checkpoint at {last}")
    raise UserError(f"{last}: cannot read checkpoint (nor {previous.name}); start without --resume")


class Round:
    """What a method's round plan may do in round ``index`` (see :mod:`raydfml.methods.base`)."""

    def __init__(self, index: int, cfg: ExperimentConfig, executor, entries, run_dir: Path, rule,
                 log_images: bool = False):
        self.index, self.cfg, self.entries, self.run_dir, self.rule = index, cfg, entries, Path(run_dir), rule
        self.ex = executor
        self.metrics: dict[str, float] = {}
        # Whether the driver logs the images of the batch the round plan returns (TensorBoard grids and
        # gallery/ PNGs). A method whose teacher work returns no images by default (its images live in
        # central state) attaches them, with the teacher's own labels, only in rounds where this is True.
        self.log_images = log_images

    def draw_teachers(self) -> list[int]:
        """The round's teachers: a seeded draw of ``train.teachers_per_round`` without replacement."""
        return round_teachers(len(self.entries), self.cfg.train.teachers_per_round, self.cfg.seed, self.index)

    def meta_handle(self, hook: str, *args, records: TeacherBatch | None = None):
        """The method's ``central_<hook>`` on the MetaLearner, unresolved (pass it on to ``on_teachers``)."""
        parts = records.parts if records is not None else []
        return self.ex.call(self.ex.meta, "central", hook, self.index, args, *parts)

    def on_meta(self, hook: str, *args, records: TeacherBatch | None = None):
        """The method's ``central_<hook>(ml, round, records, *args)`` on the MetaLearner, resolved."""
        return self.ex.get(self.meta_handle(hook, *args, records=records))

    def theta(self):
        """A handle of the current meta-parameters (one flat vector, sent once to every actor)."""
        return self.ex.call(self.ex.meta, "flat_params")

    def on_teachers(self, hook: str, teachers: list[int], *shared, per_teacher: dict | None = None) -> TeacherBatch:
        """The method's ``teacher_<hook>(pool, round, teacher, per_teacher[teacher], *shared)`` for each
        of ``teachers``, shared among the TeacherPool actors."""
        return self.ex.map_teachers(hook, self.index, list(teachers), tuple(shared), per_teacher)

    def fetch(self, batch: TeacherBatch) -> list[TeacherRecord]:
        """The batch's full records, here (only where the driver itself needs arrays)."""
        return merge(self.ex.get(list(batch.parts)))

    def bank(self, batch: TeacherBatch) -> None:
        """The batch's recovered images into the MetaLearner's task memory bank."""
        self.ex.get(self.ex.call(self.ex.meta, "bank_records", *batch.parts))

    def aggregate(self, batch: TeacherBatch) -> None:
        """One meta-update from the batch's per-teacher contributions with the configured rule. A
        two-pass rule first gets each teacher's displaced state from the MetaLearner and has the
        TeacherPool take the teachers' gradients there."""
        ex, ml = self.ex, self.ex.meta
        if self.rule.two_pass:
            t0 = time.perf_counter()
            thetas, stats = ex.get(ex.call(ml, "displace", *batch.parts))
            self.metrics.update(stats)
            batch = self.on_teachers("grad_at", batch.teachers, self.rule.needs, per_teacher=thetas)
            self.metrics["time/second_pass_s"] = time.perf_counter() - t0
        self.metrics.update(ex.get(ex.call(ml, "aggregate", self.index, *batch.parts)))

    @contextlib.contextmanager
    def timed(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.metrics[key] = time.perf_counter() - t0


def train(cfg: ExperimentConfig, run_dir: Path, report, resume: bool = False, progress: bool = True,
          executor=None, entries=None, on_round_end=None) -> dict:
    """The round loop. Returns the trained parameters (best on meta-val) and training statistics.

    ``on_round_end(round, metrics, executor)`` is called after each round's checkpoint (Tune reports
    from it; tests use it to inject faults).
    """
    from .executor import InProcessExecutor, RayExecutor

    pool_classes = sorted({c for e in entries for c in e.global_classes})
    owned = executor is None
    if owned:
        executor = (RayExecutor if cfg.runtime.workers > 0 else InProcessExecutor)(cfg, entries, pool_classes)
    try:
        return _round_loop(cfg, Path(run_dir), report, resume, progress, executor, entries, on_round_end)
    finally:
        if owned:
            executor.shutdown()   # release the actors' resources for the evaluation tasks


MAX_META_RESTARTS = 2      # a MetaLearner that dies is replaced from the last checkpoint at most this often


def _from_checkpoint(ex, run_dir: Path, report) -> int:
    """Load the last checkpoint into the MetaLearner; the round to continue at (0 without one)."""
    if not any((Path(run_dir) / c).is_file() for c in (CHECKPOINT, PREVIOUS)):
        if report is not None:
            report.truncate(after_round=-1)
        return 0
    ck = load_checkpoint(run_dir)
    ex.get(ex.call(ex.meta, "load_state_dict", ck["meta"]))
    if report is not None:
        report.truncate(after_round=int(ck["round"]))
    return int(ck["round"]) + 1


def _round_loop(cfg, run_dir: Path, report, resume, progress, executor, entries, on_round_end) -> dict:
    """Rounds from the start (or the checkpoint); a MetaLearner actor that dies mid-run is replaced
    and the run continues from its last checkpoint, as a --resume would."""
    from ray.exceptions import ObjectLostError, RayActorError, WorkerCrashedError

    ex = executor
    start = 0
    if resume:
        start = _from_checkpoint(ex, run_dir, report)
        print(f"resuming from the checkpoint of round {start - 1}: continuing at round {start}", flush=True)
    restarts = 0
    while True:
        try:
            return _rounds(cfg, run_dir, report, start, progress, ex, entries, on_round_end)
        except (RayActorError, WorkerCrashedError, ObjectLostError):
            if not hasattr(ex, "restart_meta") or ex.meta_alive():
                raise
            if restarts == MAX_META_RESTARTS:
                raise UserError(f"the MetaLearner actor died {restarts + 1} times (see the Ray logs for why); "
                                f"`--resume` continues from {Path(run_dir) / CHECKPOINT}") from None
            restarts += 1
            log.warning("the MetaLearner actor died; replacing it and continuing from the last checkpoint")
            print("the MetaLearner actor died: replaced, continuing from the last checkpoint", file=sys.stderr)
            ex.restart_meta()
            start = _from_checkpoint(ex, run_dir, report)


def _rounds(cfg, run_dir: Path, report, start: int, progress, ex, entries, on_round_end) -> dict:
    ml = ex.meta
    tr = cfg.train
    method, rule = create_method(cfg), build_rule(cfg)     # the driver's side: the round plan
    bar = tqdm(range(start, tr.rounds), initial=start, total=tr.rounds, desc=f"{cfg.label} rounds",
               unit="round", disable=not progress)
    last_val = None
    # train.source=real: a round is as many meta-updates on real episodes as a data-free round makes
    # (its replay plus the per-teacher step), so equal rounds are equal meta-update budgets.
    real = tr.source == "real"
    replay_batches = tr.replay_batches + (tr.kd_steps if real else 0)
    for r in bar:
        t_round = time.perf_counter()
        log_images = report is not None and (r == start or (r + 1) % tr.eval_every == 0)
        rnd = Round(r, cfg, ex, entries, run_dir, rule, log_images=log_images)
        try:
            batch = method.run_round(rnd) if not real else None     # real episodes: no teachers
        except RunStopped:
            # Nothing of round r happened: checkpoint the state after round r - 1, so that --resume
            # continues at round r (also when train.checkpoint_every skipped the last rounds).
            save_checkpoint(run_dir, r - 1, ex.get(ex.call(ml, "state_dict")))
            bar.close()
            raise
        maybe_fail("after_synthesis", r)
        metrics = rnd.metrics
        if batch is not None and batch.summaries:
            _synthesis_metrics(batch.summaries, metrics)
            if log_images:
                for rec in [rec for rec in rnd.fetch(batch) if rec.images is not None][:2]:
                    report.log_images(r, f"synth/teacher_{rec.teacher}",
                                      torch.tensor(np.asarray(rec.images[:50]), dtype=torch.float32))
                    report.save_gallery(r, rec)       # gallery/: captioned with the teacher's label + confidence
        metrics.update(ex.get(ex.call(ml, "replay", r, replay_batches)))
        maybe_fail("after_meta_step", r)
        if (r + 1) % tr.eval_every == 0 or r == tr.rounds - 1:
            val = ex.get(ex.call(ml, "validate", r))
            metrics.update(val)
            last_val = val["val/acc"]
        metrics["time/round_s"] = time.perf_counter() - t_round
        if report is not None:
            report.log_round(r, metrics)
        if (r + 1) % tr.checkpoint_every == 0 or r == tr.rounds - 1:
            save_checkpoint(run_dir, r, ex.get(ex.call(ml, "state_dict")))
        if on_round_end is not None:
            on_round_end(r, metrics, ex)
        if last_val is not None:
            bar.set_postfix(val_acc=f"{last_val:.1f}")
    bar.close()
    state = ex.get(ex.call(ml, "state_dict"))
    return {"best_params": state["best_params"], "meta_updates": state["meta_updates"],
            "best_val": state["best_val"], "best_round": state["best_round"], "actors_replaced": ex.replaced,
            "weights": ex.get(ex.call(ml, "weights_report")),
            "method_report": ex.get(ex.call(ml, "method_report"))}


def _synthesis_metrics(summaries: list[TeacherRecord], metrics: dict) -> None:
    """Recovery quality and cost of the round, and how many teachers of each architecture it visited."""
    metrics["synth/teacher_acc"] = float(np.mean([r.teacher_acc for r in summaries]))
    metrics["synth/inv_loss"] = float(np.mean([r.inv_loss for r in summaries]))
    metrics["synth/passes"] = float(sum(r.passes for r in summaries))
    for arch in sorted({r.arch for r in summaries}):
        metrics[f"teachers/{arch}"] = float(sum(r.arch == arch for r in summaries))
        metrics[f"synth/teacher_acc/{arch}"] = float(np.mean([r.teacher_acc for r in summaries if r.arch == arch]))
    for r in summaries:                      # per teacher (TensorBoard groups them under synth/teacher_acc_by_id)
        metrics[f"synth/teacher_acc_by_id/{r.teacher}"] = float(r.teacher_acc)
