"""Run the roles in-process or as Ray actors with the same driver code.

``Executor.call(role, method, *args)`` returns a handle and ``Executor.get(handles)`` resolves them:
plain values in-process, ``ObjectRef``s on Ray. TeacherPool work goes through ``map_teachers``: the
round's teachers are split into one share per actor, each actor returns its records' summaries (which
the driver reads) and the full records (whose handles the driver passes on to the MetaLearner, so
recovered images cross the object store once). An actor that dies is replaced and its share redone
(the work is seeded by round and teacher, so the redo gives the same result).
"""
from __future__ import annotations

import logging

from dataclasses import dataclass
from typing import Any

from ..config import ExperimentConfig
from ..errors import UserError
from ..records import TeacherRecord, merge
from .meta_learner import MetaLearner
from .pool import PoolEntry
from .teacher_pool import TeacherPool

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3            # a share is tried on at most this many actors (the first and two replacements)


@dataclass
class TeacherBatch:
    """The result of one phase of TeacherPool work: the records' summaries (teacher order, no arrays)
    and, per share, a handle of the full records (an ``ObjectRef`` on Ray, the list in-process)."""
    summaries: list[TeacherRecord]
    parts: list[Any]

    @property
    def teachers(self) -> list[int]:
        return [r.teacher for r in self.summaries]


def shares(teacher_ids: list[int], n: int) -> list[list[int]]:
    """Teachers split round-robin over ``n`` actors (empty shares dropped)."""
    return [s for s in (teacher_ids[i::n] for i in range(n)) if s]


def _work_args(share: list[int], per_teacher: dict | None) -> dict | None:
    return None if per_teacher is None else {t: per_teacher[t] for t in share}


class InProcessExecutor:
    """Everything in this process: the debugging mode and the baseline for Ray's overhead."""

    def __init__(self, cfg: ExperimentConfig, entries: list[PoolEntry], pool_classes: list[int]):
        from ..utils import resolve_device

        dev = str(resolve_device(cfg.runtime.device))
        self.meta = MetaLearner(cfg.to_dict(), pool_classes, device=dev)
        self.pools = [TeacherPool(cfg.to_dict(), entries, device=dev)] if entries else []   # real episodes: none
        self.replaced = 0

    def call(self, role, method: str, *args):
        return getattr(role, method)(*args)

    def get(self, handle):
        return handle

    def put(self, value):
        return value

    def map_teachers(self, hook: str, round_idx: int, teacher_ids: list[int], shared: tuple = (),
                     per_teacher: dict | None = None) -> TeacherBatch:
        """The method's teacher hook for every teacher (one share: this process's one pool)."""
        summaries, records = self.pools[0].work(hook, round_idx, list(teacher_ids),
                                                _work_args(teacher_ids, per_teacher), *shared)
        return TeacherBatch(merge([summaries]), [records])

    @property
    def num_pools(self) -> int:
        return 1

    def shutdown(self) -> None:
        pass


class RayExecutor:
    """One MetaLearner actor and ``workers`` TeacherPool actors (GPU shares when the cluster has GPUs)."""

    def __init__(self, cfg: ExperimentConfig, entries: list[PoolEntry], pool_classes: list[int]):
        import ray

        from ..cluster import actor_cpu_share, ensure_ray, gpu_fraction

        ensure_ray(address=cfg.runtime.address)
        self.ray = ray
        self.cfg = cfg
        self.entries = entries
        rt = cfg.runtime
        n_actors = max(1, rt.workers) + 1          # the TeacherPool actors and the MetaLearner
        gpus = rt.actor_gpus if rt.actor_gpus is not None else gpu_fraction(n_actors)
        cpus = rt.actor_cpus if rt.actor_cpus is not None else actor_cpu_share(n_actors)
        self._pool_opts = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
        strategy = rt.pool_strategy or "default"
        if strategy.lower() not in ("default", "spread"):
            raise UserError(f"config runtime.pool_strategy={strategy!r}: choose default or spread")
        if strategy.lower() == "spread":          # one TeacherPool per node where possible (multi-node runs)
            self._pool_opts["scheduling_strategy"] = "SPREAD"
        self._pool_cls = ray.remote(TeacherPool)
        self._meta_opts, self._pool_classes = dict(num_cpus=cpus, num_gpus=gpus), pool_classes
        self.meta = ray.remote(MetaLearner).options(**self._meta_opts).remote(cfg.for_workers(), pool_classes)
        self.pools = [self._new_pool() for _ in range(max(1, rt.workers))] if entries else []
        self.replaced = 0
        self._wait_until_scheduled([self.meta, *self.pools])

    def _wait_until_scheduled(self, actors, timeout_s: float = 120.0) -> None:
        """Fail with a clear message instead of hanging when the cluster cannot place the actors."""
        refs = [a.ping.remote() for a in actors]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            res = self.ray.cluster_resources()
            raise UserError(f"--workers {self.cfg.runtime.workers}: only {len(ready)} of {len(refs)} actors could be "
                            f"scheduled within {timeout_s:.0f}s on a cluster with {res.get('CPU', 0):g} CPUs and "
                            f"{res.get('GPU', 0):g} GPUs; lower --workers or runtime.actor_cpus")
        self.ray.get(ready)

    def meta_alive(self, timeout_s: float = 30.0) -> bool:
        try:
            ready, _ = self.ray.wait([self.meta.ping.remote()], timeout=timeout_s)
            return bool(ready) and bool(self.ray.get(ready[0]))
        except Exception:
            return False

    def restart_meta(self) -> None:
        """A fresh MetaLearner actor in place of a dead one (the driver then loads its checkpoint)."""
        from .meta_learner import MetaLearner

        try:
            self.ray.kill(self.meta)
        except Exception:
            pass
        self.meta = self.ray.remote(MetaLearner).options(**self._meta_opts).remote(self.cfg.for_workers(),
                                                                                 self._pool_classes)
        self.replaced += 1
        self._wait_until_scheduled([self.meta])

    def _new_pool(self):
        return self._pool_cls.options(**self._pool_opts).remote(self.cfg.for_workers(), self.entries)

    @property
    def num_pools(self) -> int:
        return len(self.pools)

    def call(self, role, method: str, *args):
        return getattr(role, method).remote(*args)

    def get(self, handle):
        return self.ray.get(handle)

    def put(self, value):
        return self.ray.put(value)

    def _submit(self, i: int, hook: str, round_idx: int, share: list[int], shared: tuple, per_teacher):
        """Share ``share`` to actor ``i``: (summaries ref, records ref). ``shared`` are top-level
        arguments, so object references among them (the broadcast meta-parameters) are resolved."""
        return self.pools[i].work.options(num_returns=2).remote(hook, round_idx, share,
                                                                _work_args(share, per_teacher), *shared)

    def map_teachers(self, hook: str, round_idx: int, teacher_ids: list[int], shared: tuple = (),
                     per_teacher: dict | None = None) -> TeacherBatch:
        """Share i goes to actor i; an actor that dies is replaced and its share redone."""
        from ray.exceptions import ObjectLostError, RayActorError, WorkerCrashedError

        lost = (RayActorError, WorkerCrashedError, ObjectLostError)      # the actor, its process or its output

        split = shares(list(teacher_ids), self.num_pools)
        refs = [self._submit(i, hook, round_idx, share, shared, per_teacher) for i, share in enumerate(split)]
        summaries, parts = [], []
        for i, share in enumerate(split):
            summary_ref, records_ref = refs[i]
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    summaries.append(self.ray.get(summary_ref))
                    parts.append(records_ref)
                    break
                except lost:
                    if not self.meta_alive(timeout_s=10):
                        raise            # the MetaLearner died (its refs are lost): the driver replaces it
                    if attempt == MAX_ATTEMPTS:
                        raise UserError(f"TeacherPool actor {i} died {MAX_ATTEMPTS} times in round {round_idx} (see "
                                        "the Ray logs for why); `--resume` continues from the last checkpoint") from None
                    log.warning("TeacherPool actor %d died; replacing it and redoing its share", i)
                    self.pools[i] = self._new_pool()
                    self.replaced += 1
                    summary_ref, records_ref = self._submit(i, hook, round_idx, share, shared, per_teacher)
        return TeacherBatch(merge(summaries), parts)

    def shutdown(self) -> None:
        for a in [self.meta, *self.pools]:
            try:
                self.ray.kill(a)
            except Exception:
                pass
