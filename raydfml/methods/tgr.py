"""``tgr``: TGR's teacher groups from a task space, and implicit gradient regularisation inside a group.

Once per run (or every ``tgr.regroup_every`` rounds), every teacher of the pool, across all datasets
and architectures, is recovered and embedded on the TeacherPool actors as the diagonal Fisher of an
offline probe; spectral clustering of the embeddings' dissimilarity forms heterogeneous groups,
cached in ``<run_dir>/tgr_groups.json``. Each round draws one group, then ``train.teachers_per_round``
of its teachers without replacement (TGR drew with replacement), recovers them with a fresh generator
(``synth.name=generator``) and makes one meta-update with the ``igr`` rule.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..utils import task_seed
from .base import TeacherRecovery
from .registry import register_method

log = logging.getLogger(__name__)
PROBES = ("random", "teacher")


@dataclass
class TgrConfig:
    """TGR's options (``--set tgr.<option>=...``); the rule's are ``igr.eta`` and ``igr.form``."""
    groups: int = 5                   # heterogeneous groups over all teachers
    regroup_every: int = 0            # re-embed and re-group every R rounds (0: groups fixed, as TGR)
    probe: str = "random"             # Fisher probe: random (a seeded Conv4) | teacher (pool teacher 0)
    grouping: str = "task_space"      # task_space (TGR) | random: the same group sizes, members drawn at random
                                      # (an ablation: the embedding phase still runs and banks its data)


@register_method("tgr")
class Tgr(TeacherRecovery):
    Config = TgrConfig
    preset = {"synth.name": "generator", "aggregate.rule": "igr"}
    # paper: TGR's scripts: 1200 epochs of 4 teachers from one of 5 groups, 30 images per class recovered in
    # 200 generator steps, replay meta-batches of 16 episodes (at least generate_interval + 1 = 5 per epoch).
    # quick: no BN-statistics prior (as FREE): at weight 1 and 15 steps the teachers classified 53% of the
    # recovered images and 46% of the bank carried a label its teacher disputed; at 0, 97% and 3%. The
    # per-teacher KD loss scaled by 0.1: its gradient (norm 5-56, replay's ~2) shares replay's Adam and
    # filled its second moment, shrinking every replay step after it (meta-test 30.0 / 42.8 -> 37.5 / 56.0).
    # quick: IGR's displacement rate 0.1 (the seeds' 1e-3 moves the meta-parameters by ~2% of one outer step,
    # so TGR behaved as plain generator inversion): ma seeds 0/1/2 at 1e-3 34.7 / 52.3, 38.7 / 60.1,
    # 39.8 / 61.0, at 0.1 36.1 / 55.6, 40.1 / 62.3, 40.2 / 62.9; on seeds 3/4, not used to choose it, equal
    # (38.2 / 58.2, 37.7 / 59.1 against 37.7 / 57.7, 37.9 / 58.7): a small gain at most (docs/fidelity.md).
    profiles = {"smoke": {"tgr.groups": 2},
                "quick": {"tgr.groups": 3, "synth.bn_weight": 0.0, "learner.kd_weight": 0.1, "learner.ce_weight": 0.1,
                          "igr.eta": 0.1},
                "paper": {"train.rounds": 1200, "synth.per_class": 30, "synth.steps": 200, "learner.meta_batch": 16,
                          "train.replay_batches": 5}}

    @classmethod
    def validate(cls, cfg) -> None:
        o = cfg.section("tgr")
        if o.groups < 1:
            raise UserError(f"config tgr.groups={o.groups}: must be at least 1")
        if o.probe not in PROBES:
            raise UserError(f"config tgr.probe={o.probe!r}: choose {' or '.join(PROBES)}")
        if o.grouping not in ("task_space", "random"):
            raise UserError(f"config tgr.grouping={o.grouping!r}: choose task_space or random")
        if o.regroup_every < 0:
            raise UserError(f"config tgr.regroup_every={o.regroup_every}: must be 0 (never) or more")
        if cfg.train.kd_steps < 1:
            raise UserError("config train.kd_steps=0: method tgr needs the per-teacher step (kd_steps >= 1)")

    # --- driver -----------------------------------------------------------------------------------
    def round_teachers(self, rnd) -> list[int]:
        if getattr(self, "groups", None) is None:
            self.groups = TaskGroups(self.cfg, rnd.entries, rnd.run_dir)
        rnd.metrics["tgr/group"] = float(self.groups.round_group(rnd.index, rnd))
        return self.groups.round_teachers(rnd.index, rnd)

    # --- TeacherPool ------------------------------------------------------------------------------
    def teacher_embed(self, pool, round_idx: int, tid: int, _payload, epoch: int, probe: str):
        """Recover the teacher's data and embed it as the diagonal Fisher of a fixed probe network.

        ``probe="random"``: a seeded random Conv4 (the same on every actor: a function of the seed);
        ``"teacher"``: pool teacher 0 (a trained network; the same for every teacher embedded). Seeded
        apart from the training rounds, by the grouping epoch.
        """
        from ..aggregation.task_space import fisher_embedding, make_probe

        net = pool.cache.get(("probe", probe))
        if net is None:
            net = pool.teacher(0) if probe == "teacher" else make_probe(
                task_seed(self.cfg.seed, 41), image_size=pool.image_size,
                adaptive_pool=self.cfg.learner.adaptive_pool, way=self.cfg.pool.way).to(pool.device)
            pool.cache[("probe", probe)] = net
        seed = task_seed(self.cfg.seed, 43, epoch, tid)
        rec = pool.synthesize(tid, seed)
        record = pool.record(tid, rec)
        spec = pool.spec_of(tid)
        emb = fisher_embedding(net, rec.images, rec.labels, spec.mean, spec.std, seed=seed)
        record.embedding = emb.cpu().numpy().astype(np.float32)
        return record


class TaskGroups:
    """TGR's heterogeneous teacher groups for a run: formed from Fisher embeddings of *all* teachers
    (computed on the TeacherPool actors), cached in ``<run_dir>/tgr_groups.json`` (reused on resume),
    re-formed every ``tgr.regroup_every`` rounds when that is > 0."""

    FILE = "tgr_groups.json"

    def __init__(self, cfg, entries, run_dir: Path):
        self.cfg, self.entries, self.run_dir = cfg, entries, Path(run_dir)
        self.options = cfg.section("tgr")
        self._groups: list[list[int]] | None = None
        self._formed_at = None

    def _epoch(self, r: int) -> int:
        every = self.options.regroup_every
        return r // every if every > 0 else 0

    def _path(self, epoch: int) -> Path:
        return self.run_dir / (self.FILE if epoch == 0 else f"tgr_groups_{epoch}.json")

    def groups(self, r: int, rnd) -> list[list[int]]:
        """The groups in force at round ``r``: from the cache file, else embedded on the actors."""
        from ..aggregation.task_space import heterogeneous_groups, load_groups, save_groups, task_similarity

        epoch = self._epoch(r)
        if self._groups is not None and self._formed_at == epoch:
            return self._groups
        ids = [e.index for e in self.entries]
        # Keyed by what the teachers are (their checksums), not their positions in the pool, and by
        # the options that shape the groups: a cache of another pool or grouping is recomputed.
        o = self.options
        identity = {"teachers": [self.entries[i].record.sha256 for i in ids], "groups": o.groups, "probe": o.probe,
                    "grouping": o.grouping, "seed": self.cfg.seed}
        groups = load_groups(self._path(epoch), teacher_ids=ids, identity=identity)
        if groups is None:
            t0 = time.perf_counter()
            batch = rnd.on_teachers("embed", ids, epoch, self.options.probe)
            # The embedding phase's recovered data is real work: it enters the bank too.
            records = rnd.fetch(batch)
            rnd.bank(batch)
            sim = task_similarity(torch.stack([torch.from_numpy(np.array(r.embedding)) for r in records]))
            n = min(self.options.groups, len(ids))
            groups = heterogeneous_groups(sim, n, seed=self.cfg.seed)
            if self.options.grouping == "random":
                groups = random_regrouping(groups, seed=self.cfg.seed)
            save_groups(self._path(epoch), groups, teacher_ids=ids, similarity=sim, identity=identity,
                        archs=[self.entries[i].record.arch for i in ids], seconds=round(time.perf_counter() - t0, 2))
            log.info("TGR groups (epoch %d): %s", epoch, groups)
        self._groups, self._formed_at = groups, epoch
        return groups

    def round_group(self, r: int, rnd) -> int:
        return int(np.random.default_rng([self.cfg.seed, 6007, r]).integers(len(self.groups(r, rnd))))

    def round_teachers(self, r: int, rnd) -> list[int]:
        """One group per round, then ``teachers_per_round`` of its teachers without replacement."""
        group = self.groups(r, rnd)[self.round_group(r, rnd)]
        rng = np.random.default_rng([self.cfg.seed, 6011, r])
        k = min(self.cfg.train.teachers_per_round, len(group))
        return sorted(int(group[i]) for i in rng.choice(len(group), size=k, replace=False))


def random_regrouping(groups: list[list[int]], seed: int) -> list[list[int]]:
    """Groups of the same sizes as ``groups`` with members drawn at random (seeded): TGR's task-space
    grouping against chance, with everything else equal."""
    members = sorted(i for g in groups for i in g)
    perm = np.random.default_rng([seed, 6029]).permutation(members).tolist()
    out, start = [], 0
    for g in groups:
        out.append(sorted(int(i) for i in perm[start:start + len(g)]))
        start += len(g)
    return out


__all__ = ["Tgr", "TgrConfig", "TaskGroups", "random_regrouping"]
