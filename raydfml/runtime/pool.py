"""The teacher pool: loading every teacher of an experiment, and picking those of a round."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ExperimentConfig
from ..zoo import TeacherRecord, ZooConfig, build_zoo, default_zoo_dir, read_manifest


@dataclass(frozen=True)
class PoolEntry:
    """One teacher of the experiment's pool: where it lives and its global class ids."""
    index: int                  # position in the pool (0..P-1), the id used by the runtime
    zoo_dir: str
    record: TeacherRecord


def zoo_config(cfg: ExperimentConfig, arch: str) -> ZooConfig:
    p = cfg.pool
    width = p.width if arch != "conv4" else 1.0
    return ZooConfig(dataset=cfg.data.dataset, arch=arch, num=p.num_per_arch, way=p.way, policy=p.policy,
                     seed=p.seed, epochs=p.epochs, width=width, image_size=cfg.data.image_size)


def zoo_dir_for(cfg: ExperimentConfig, zcfg: ZooConfig) -> Path:
    """``--zoo-dir`` when the pool has one architecture, else a derived directory per architecture."""
    if cfg.pool.zoo_dir and len(cfg.pool.archs) == 1:
        return Path(cfg.pool.zoo_dir).resolve()
    return default_zoo_dir(Path(cfg.data.data_root).resolve(), zcfg)


def prepare_pool(cfg: ExperimentConfig, workers: int, progress: bool = True) -> list[PoolEntry]:
    """Build (or reuse) one zoo per architecture of the scenario and list every teacher in it."""
    data_root = Path(cfg.data.data_root).resolve()
    entries: list[PoolEntry] = []
    for arch in cfg.pool.archs:
        zcfg = zoo_config(cfg, arch)
        zoo_dir = zoo_dir_for(cfg, zcfg)
        records = build_zoo(zcfg, zoo_dir, data_root, workers=workers, device=cfg.runtime.device, progress=progress)
        for rec in records[: cfg.pool.num_per_arch]:
            entries.append(PoolEntry(len(entries), str(zoo_dir), rec))
    return entries


def existing_pool(cfg: ExperimentConfig) -> list[PoolEntry]:
    """The pool as the manifests describe it (no training); used when resuming."""
    entries: list[PoolEntry] = []
    for arch in cfg.pool.archs:
        zoo_dir = zoo_dir_for(cfg, zoo_config(cfg, arch))
        for rec in read_manifest(zoo_dir)[: cfg.pool.num_per_arch]:
            entries.append(PoolEntry(len(entries), str(zoo_dir), rec))
    return entries


def round_teachers(num_teachers: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """The teachers visited in a round: a seeded draw without replacement (FREE drew with replacement)."""
    rng = np.random.default_rng([seed, 7919, round_idx])
    k = min(per_round, num_teachers)
    return sorted(int(i) for i in rng.choice(num_teachers, size=k, replace=False))


def shard(indices: list[int], num_shards: int) -> list[list[int]]:
    """Teachers of the pool assigned to actors round-robin (actor i hosts teachers i, i+n, ...)."""
    return [indices[i::num_shards] for i in range(num_shards)]
