"""The teacher pool: loading every teacher of an experiment, and picking those of a round.

The pool holds one zoo per (dataset, architecture): the datasets are the scenario's domains
(``data.domains``, scenario md) or the one ``data.dataset``. A zoo's manifest lists each teacher's
classes as ids of its own dataset's meta-train split, so two domains both have a class 3. The pool
makes them GLOBAL ids by adding a per-domain offset, ``CLASS_OFFSET_STRIDE * domain index``
(domain 0: ids as in its manifest; domain 1: +1000; ...): the task memory bank keys its classes by
global id and so never mixes two domains' class 3. A stride of 1000 leaves room for any meta-train
split here (CUB's 100 classes are the largest) and keeps ids readable (1003 = domain 1, class 3).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ExperimentConfig
from ..errors import UserError
from ..zoo import TeacherRecord, ZooConfig, build_zoo, default_zoo_dir, read_manifest

CLASS_OFFSET_STRIDE = 1000


@dataclass(frozen=True)
class PoolEntry:
    """One teacher of the experiment's pool: where it lives, its dataset and its global class ids."""
    index: int                  # position in the pool (0..P-1), the id used by the runtime
    zoo_dir: str
    record: TeacherRecord
    dataset: str = ""           # the teacher's dataset (domain); "" means record.dataset
    class_offset: int = 0       # added to record.classes to make them global (CLASS_OFFSET_STRIDE * domain)

    def __post_init__(self) -> None:
        if not self.dataset:
            object.__setattr__(self, "dataset", self.record.dataset)

    @property
    def global_classes(self) -> tuple[int, ...]:
        """The teacher's classes as pool-wide ids: output j of the teacher is global class ``global_classes[j]``."""
        return tuple(c + self.class_offset for c in self.record.classes)


def pool_datasets(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The datasets the pool is trained on: the md domains in order, else ``data.dataset`` alone."""
    domains = tuple(cfg.data.domains)
    for d in domains:
        if domains.count(d) > 1:
            raise UserError(f"config data.domains lists {d!r} twice; each domain is one dataset of the pool")
    return domains or (cfg.data.dataset,)


def class_offset(cfg: ExperimentConfig, dataset: str) -> int:
    """The global-id offset of ``dataset``'s classes: CLASS_OFFSET_STRIDE times its domain index."""
    datasets = pool_datasets(cfg)
    if dataset not in datasets:
        raise UserError(f"dataset {dataset!r} is not one of the pool's datasets ({', '.join(datasets)})")
    return CLASS_OFFSET_STRIDE * datasets.index(dataset)


def class_dataset(cfg: ExperimentConfig, global_class: int) -> str:
    """The dataset (domain) a global class id belongs to (inverse of ``class_offset``)."""
    datasets = pool_datasets(cfg)
    domain = int(global_class) // CLASS_OFFSET_STRIDE
    if not 0 <= domain < len(datasets):
        raise ValueError(f"global class {global_class} lies outside the pool's {len(datasets)} dataset(s)")
    return datasets[domain]


def zoo_config(cfg: ExperimentConfig, arch: str, dataset: str | None = None) -> ZooConfig:
    """The zoo of ``arch`` teachers on ``dataset`` (default ``data.dataset``).

    ``pool.arch_plans=distinct``: the architectures' zoos take consecutive class plans (architecture a's
    teacher k gets plan ``a * num_per_arch + k``), so a multi-architecture pool covers more classes;
    ``shared``: every architecture repeats the first zoo's plans (what this engine did before; 18
    teachers of ``ma`` quick then covered 23 of 64 glyph classes).
    """
    p = cfg.pool
    width = p.width if arch != "conv4" else 1.0
    offset = p.archs.index(arch) * p.num_per_arch if p.arch_plans == "distinct" else 0
    return ZooConfig(dataset=dataset or cfg.data.dataset, arch=arch, num=p.num_per_arch, way=p.way,
                     policy=p.policy, seed=p.seed, epochs=p.epochs, width=width, image_size=cfg.data.image_size,
                     optimizer=p.optimizer, plan_offset=offset)


def zoo_dir_for(cfg: ExperimentConfig, zcfg: ZooConfig) -> Path:
    """``--zoo-dir`` itself when the pool is a single zoo (one dataset, one architecture); for several
    (ma, md) one derived sub-folder per (dataset, architecture) inside ``--zoo-dir``; without it, the
    derived folders under ``<data_root>/zoo``."""
    derived = default_zoo_dir(Path(cfg.data.data_root).resolve(), zcfg)
    if not cfg.pool.zoo_dir:
        return derived
    base = Path(cfg.pool.zoo_dir).resolve()
    return base if len(cfg.pool.archs) == 1 and len(pool_datasets(cfg)) == 1 else base / derived.name


def pool_zoos(cfg: ExperimentConfig) -> list[tuple[ZooConfig, Path, int]]:
    """Every zoo of the pool with its directory and class offset, domain-major (domain 0's
    architectures first): the order of the pool's entries."""
    out = []
    for dataset in pool_datasets(cfg):
        offset = class_offset(cfg, dataset)
        for arch in cfg.pool.archs:
            zcfg = zoo_config(cfg, arch, dataset)
            out.append((zcfg, zoo_dir_for(cfg, zcfg), offset))
    return out


def prepare_pool(cfg: ExperimentConfig, workers: int, progress: bool = True) -> list[PoolEntry]:
    """Build (or reuse) one zoo per (dataset, architecture) of the scenario and list every teacher in it."""
    data_root = Path(cfg.data.data_root).resolve()
    entries: list[PoolEntry] = []
    for zcfg, zoo_dir, offset in pool_zoos(cfg):
        records = build_zoo(zcfg, zoo_dir, data_root, workers=workers, device=cfg.runtime.device, progress=progress)
        for rec in records[: cfg.pool.num_per_arch]:
            entries.append(PoolEntry(len(entries), str(zoo_dir), rec, zcfg.dataset, offset))
    return entries


def existing_pool(cfg: ExperimentConfig) -> list[PoolEntry]:
    """The pool as the manifests describe it (no training); used when resuming."""
    entries: list[PoolEntry] = []
    for zcfg, zoo_dir, offset in pool_zoos(cfg):
        for rec in read_manifest(zoo_dir)[: cfg.pool.num_per_arch]:
            entries.append(PoolEntry(len(entries), str(zoo_dir), rec, zcfg.dataset, offset))
    return entries


def round_teachers(num_teachers: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """The teachers visited in a round: a seeded draw without replacement (FREE drew with replacement)."""
    rng = np.random.default_rng([seed, 7919, round_idx])
    k = min(per_round, num_teachers)
    return sorted(int(i) for i in rng.choice(num_teachers, size=k, replace=False))


def shard(indices: list[int], num_shards: int) -> list[list[int]]:
    """Teachers of the pool assigned to actors round-robin (actor i hosts teachers i, i+n, ...)."""
    return [indices[i::num_shards] for i in range(num_shards)]
