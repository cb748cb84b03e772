"""Run the roles in-process or as Ray actors with the same driver code.

``Executor.call(role, method, *args)`` returns a handle and ``Executor.get(handles)`` resolves them:
plain values in-process, ``ObjectRef``s on Ray. TeacherPool calls go through ``map_pool``, which
replaces an actor that died and redoes its share of the round (the calls are seeded by round and
teacher, so the redo gives the same result).
"""
from __future__ import annotations

import logging

from ..config import ExperimentConfig
from ..errors import UserError
from .meta_learner import MetaLearner
from .pool import PoolEntry
from .teacher_pool import TeacherPool

log = logging.getLogger(__name__)


class InProcessExecutor:
    """Everything in this process: the debugging mode and the baseline for Ray's overhead."""

    def __init__(self, cfg: ExperimentConfig, entries: list[PoolEntry], pool_classes: list[int]):
        from ..utils import resolve_device

        dev = str(resolve_device(cfg.runtime.device))
        self.meta = MetaLearner(cfg.to_dict(), pool_classes, device=dev)
        self.pools = [TeacherPool(cfg.to_dict(), entries, device=dev)]
        self.replaced = 0

    def call(self, role, method: str, *args):
        return getattr(role, method)(*args)

    def get(self, handle):
        return handle

    def put(self, value):
        return value

    def map_pool(self, method: str, round_idx: int, shares: list, *args) -> list:
        """Run ``method(round_idx, share, *args)`` for each share of the round's teachers, in share order."""
        return [getattr(self.pools[0], method)(round_idx, share, *args) for share in shares]

    @property
    def num_pools(self) -> int:
        return 1

    def shutdown(self) -> None:
        pass


class RayExecutor:
    """One MetaLearner actor and ``workers`` TeacherPool actors (GPU shares when the cluster has GPUs)."""

    def __init__(self, cfg: ExperimentConfig, entries: list[PoolEntry], pool_classes: list[int]):
        import ray

        from .cluster import actor_cpu_share, ensure_ray, gpu_fraction

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
        self.meta = ray.remote(MetaLearner).options(num_cpus=cpus, num_gpus=gpus).remote(cfg.to_dict(), pool_classes)
        self.pools = [self._new_pool() for _ in range(max(1, rt.workers))]
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

    def _new_pool(self):
        return self._pool_cls.options(**self._pool_opts).remote(self.cfg.to_dict(), self.entries)

    @property
    def num_pools(self) -> int:
        return len(self.pools)

    def call(self, role, method: str, *args):
        return getattr(role, method).remote(*args)

    def get(self, handle):
        return self.ray.get(handle)

    def put(self, value):
        return self.ray.put(value)

    def map_pool(self, method: str, round_idx: int, shares: list, *args) -> list:
        """Share i goes to actor i; an actor that dies is replaced and its share redone."""
        from ray.exceptions import RayActorError

        refs = [getattr(self.pools[i], method).remote(round_idx, share, *args) for i, share in enumerate(shares)]
        results = []
        for i, ref in enumerate(refs):
            for attempt in range(3):
                try:
                    results.append(self.ray.get(ref))
                    break
                except RayActorError:
                    log.warning("TeacherPool actor %d died; replacing it and redoing its share", i)
                    self.pools[i] = self._new_pool()
                    self.replaced += 1
                    ref = getattr(self.pools[i], method).remote(round_idx, shares[i], *args)
            else:
                raise RuntimeError(f"TeacherPool actor {i} died three times in one round")
        return results

    def shutdown(self) -> None:
        for a in [self.meta, *self.pools]:
            try:
                self.ray.kill(a)
            except Exception:
                pass
