"""The driver: one experiment end to end.

data -> teacher pool -> rounds of (teacher-side recovery and gradients on the TeacherPool,
aggregation + replay + meta-val on the MetaLearner) -> final seeded meta-test with baselines ->
run directory. Checkpoints after every round make ``resume`` lose at most the round in flight.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import ExperimentConfig
from ..data.layout import ensure_dataset
from ..errors import UserError
from ..utils import atomic_path, seed_everything
from .pool import existing_pool, prepare_pool, round_teachers

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoints/last.pt"


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / f"{cfg.scenario}-{cfg.method}-{cfg.profile}-s{cfg.seed}"


def _save_checkpoint(run_dir: Path, round_idx: int, meta_state: dict) -> None:
    with atomic_path(run_dir / CHECKPOINT) as tmp:
        torch.save({"round": round_idx, "meta": meta_state}, tmp)


def _load_checkpoint(run_dir: Path) -> dict:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: cannot read checkpoint ({type(exc).__name__}); start without --resume") from None


def purer_loss_cfg(cfg: ExperimentConfig) -> dict:
    """PURER's per-teacher loss weights (the seeds' values; TV/L2 fixed, BN-stats weight 0.01)."""
    return {"bn_weight": 0.01, "tv_weight": 1e-4, "l2_weight": 1e-5, "augment": "shift"}


def _gather(parts: list[list[dict]]) -> list[dict]:
    """The actors' items in teacher order: what follows (FREE's sequential alignment above all) must
    not depend on how many actors shared the round."""
    return sorted((it for part in parts for it in part), key=lambda it: it["teacher"])


def _shares(tids: list[int], n: int) -> list[list[int]]:
    shares = [tids[i::n] for i in range(n)]
    return [s for s in shares if s]


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
        return _round_loop(cfg, run_dir, report, resume, progress, executor, entries, on_round_end)
    finally:
        if owned:
            executor.shutdown()   # free the actors' resources for the evaluation tasks


def _round_loop(cfg, run_dir, report, resume, progress, executor, entries, on_round_end) -> dict:
    ex, ml = executor, executor.meta
    start = 0
    if resume:
        ck = _load_checkpoint(run_dir)
        ex.get(ex.call(ml, "load_state_dict", ck["meta"]))
        start = int(ck["round"]) + 1
        report.truncate(after_round=int(ck["round"]))
        print(f"resuming from the checkpoint of round {ck['round']}: continuing at round {start}", flush=True)
    tr = cfg.train
    tgr = TaskGroups(cfg, ex, entries, run_dir) if cfg.aggregate.rule == "tgr" else None
    bar = tqdm(range(start, tr.rounds), initial=start, total=tr.rounds, desc=f"{cfg.method} rounds",
               unit="round", disable=not progress)
    last_val = None
    for r in bar:
        t_round = time.perf_counter()
        tids = round_teachers(len(entries), tr.teachers_per_round, cfg.seed, r)
        shares = _shares(tids, ex.num_pools)
        metrics: dict[str, float] = {}
        rule = cfg.aggregate.rule
        if cfg.synth.name == "purer":
            metrics.update(_purer_round(ex, ml, r, shares, entries, purer_loss_cfg(cfg)))
            results = []
        elif rule == "free":
            results = _free_round(cfg, ex, ml, r, shares, metrics)
        else:
            if rule == "tgr":
                tids = tgr.round_teachers(r)
                shares = _shares(tids, ex.num_pools)
                metrics["tgr/group"] = float(tgr.round_group(r))
            results = (_tgr_round if rule == "tgr" else _mean_round)(cfg, ex, ml, r, shares, metrics)
        if results:
            _synthesis_metrics(results, metrics)
            if report is not None and (r == start or (r + 1) % tr.eval_every == 0):
                for it in results[:2]:
                    report.log_images(r, f"synth/teacher_{it['teacher']}", torch.tensor(np.asarray(it["images"][:50]), dtype=torch.float32))
        metrics.update(ex.get(ex.call(ml, "replay", tr.replay_batches)))
        if (r + 1) % tr.eval_every == 0 or r == tr.rounds - 1:
            val = ex.get(ex.call(ml, "validate", r))
            metrics.update(val)
            last_val = val["val/acc"]
        metrics["time/round_s"] = time.perf_counter() - t_round
        if report is not None:
            report.log_round(r, metrics)
        if (r + 1) % tr.checkpoint_every == 0 or r == tr.rounds - 1:
            _save_checkpoint(run_dir, r, ex.get(ex.call(ml, "state_dict")))
        if on_round_end is not None:
            on_round_end(r, metrics, ex)
        if last_val is not None:
            bar.set_postfix(val_acc=f"{last_val:.1f}")
    bar.close()
    state = ex.get(ex.call(ml, "state_dict"))
    return {"best_params": state["best_params"], "meta_updates": state["meta_updates"],
            "best_val": state["best_val"], "best_round": state["best_round"], "actors_replaced": ex.replaced}


def _synthesis_metrics(results: list[dict], metrics: dict) -> None:
    metrics["synth/teacher_acc"] = float(np.mean([it["teacher_acc"] for it in results]))
    metrics["synth/inv_loss"] = float(np.mean([it["inv_loss"] for it in results]))
    metrics["synth/passes"] = float(sum(it["passes"] for it in results))
    for arch in sorted({it["arch"] for it in results}):
        metrics[f"teachers/{arch}"] = float(sum(it["arch"] == arch for it in results))


def _mean_round(cfg, ex, ml, r: int, shares, metrics: dict) -> list[dict]:
    """Recovery + per-teacher meta-gradients at the broadcast state, averaged by the MetaLearner."""
    theta = ex.call(ml, "flat_params") if cfg.train.kd_steps > 0 else None
    t0 = time.perf_counter()
    results = _gather(ex.map_pool("recover", r, shares, theta))
    metrics["time/synthesis_s"] = time.perf_counter() - t0
    ex.get(ex.call(ml, "add_recovered", results))
    if cfg.train.kd_steps > 0:
        metrics.update(ex.get(ex.call(ml, "apply_teacher_grads", [it["grad"] for it in results], "mean")))
        metrics["kd/loss"] = float(np.mean([it["kd_loss"] for it in results]))
    return results


def _free_round(cfg, ex, ml, r: int, shares, metrics: dict) -> list[dict]:
    """FREE: adapt the broadcast meta-generator to each teacher on the actors; the MetaLearner updates
    the meta-generator and, after warm-up, banks every task and takes the alignment step."""
    warmup = r < cfg.synth.warmup
    gen_state = ex.call(ml, "generator_state")
    theta = None if warmup else ex.call(ml, "flat_params")
    t0 = time.perf_counter()
    results = _gather(ex.map_pool("recover_free", r, shares, gen_state, theta))
    metrics["time/synthesis_s"] = time.perf_counter() - t0
    metrics.update(ex.get(ex.call(ml, "free_step", results, warmup)))
    return results


def _tgr_round(cfg, ex, ml, r: int, shares, metrics: dict) -> list[dict]:
    """TGR inside one group. First order (default), two phases across the actors: g_i at θ, then
    G_i at each teacher's displaced state θ - η(ḡ - g_i); the update is mean G_i. Exact: the tasks
    travel to the MetaLearner, which differentiates through g_i and ḡ."""
    exact = cfg.aggregate.tgr_form == "exact"
    theta = None if exact else ex.call(ml, "flat_params")
    t0 = time.perf_counter()
    results = _gather(ex.map_pool("recover", r, shares, theta, "task", exact))
    metrics["time/synthesis_s"] = time.perf_counter() - t0
    ex.get(ex.call(ml, "add_recovered", results))
    if exact:
        metrics.update(ex.get(ex.call(ml, "tgr_exact_step", results)))
        return results
    t0 = time.perf_counter()
    displaced, stats = ex.get(ex.call(ml, "tgr_displaced", [it["grad"] for it in results]))
    theta_of = {it["teacher"]: th for it, th in zip(results, displaced)}
    parts = ex.map_pool("task_grads", r, [{t: theta_of[t] for t in share} for share in shares])
    G = {t: g for part in parts for t, g in part.items()}
    metrics.update(ex.get(ex.call(ml, "apply_teacher_grads", [G[it["teacher"]]["grad"] for it in results], "mean")))
    metrics.update(stats)
    metrics["kd/loss"] = float(np.mean([G[t]["loss"] for t in G]))
    metrics["time/igr_s"] = time.perf_counter() - t0
    return results


class TaskGroups:
    """TGR's heterogeneous teacher groups for a run: formed from Fisher embeddings of *all* teachers
    (computed on the TeacherPool actors), cached in ``<run_dir>/tgr_groups.json`` (reused on resume),
    re-formed every ``aggregate.tgr_regroup_every`` rounds when that is > 0. Each round draws one
    group, then ``teachers_per_round`` of its teachers without replacement (TGR drew with replacement)."""

    FILE = "tgr_groups.json"

    def __init__(self, cfg, ex, entries, run_dir: Path):
        self.cfg, self.ex, self.entries, self.run_dir = cfg, ex, entries, Path(run_dir)
        self._groups: list[list[int]] | None = None
        self._formed_at = None

    def _epoch(self, r: int) -> int:
        every = self.cfg.aggregate.tgr_regroup_every
        return r // every if every > 0 else 0

    def _path(self, epoch: int) -> Path:
        return self.run_dir / (self.FILE if epoch == 0 else f"tgr_groups_{epoch}.json")

    def groups(self, r: int) -> list[list[int]]:
        from ..aggregation.task_space import heterogeneous_groups, load_groups, save_groups, task_similarity

        epoch = self._epoch(r)
        if self._groups is not None and self._formed_at == epoch:
            return self._groups
        ids = [e.index for e in self.entries]
        groups = load_groups(self._path(epoch), teacher_ids=ids)
        if groups is None:
            t0 = time.perf_counter()
            shares = _shares(ids, self.ex.num_pools)
            items = _gather(self.ex.map_pool("embed", epoch, shares, self.cfg.aggregate.tgr_probe))
            # The embedding phase's recovered data is real work: it enters the bank too.
            self.ex.get(self.ex.call(self.ex.meta, "add_recovered", items))
            sim = task_similarity(torch.stack([torch.from_numpy(np.asarray(it["embedding"])) for it in items]))
            n = min(self.cfg.aggregate.tgr_groups, len(ids))
            groups = heterogeneous_groups(sim, n, seed=self.cfg.seed)
            save_groups(self._path(epoch), groups, teacher_ids=ids, similarity=sim,
                        archs=[self.entries[i].record.arch for i in ids], seconds=round(time.perf_counter() - t0, 2))
            log.info("TGR groups (epoch %d): %s", epoch, groups)
        self._groups, self._formed_at = groups, epoch
        return groups

    def round_group(self, r: int) -> int:
        return int(np.random.default_rng([self.cfg.seed, 6007, r]).integers(len(self.groups(r))))

    def round_teachers(self, r: int) -> list[int]:
        group = self.groups(r)[self.round_group(r)]
        rng = np.random.default_rng([self.cfg.seed, 6011, r])
        k = min(self.cfg.train.teachers_per_round, len(group))
        return sorted(int(group[i]) for i in rng.choice(len(group), size=k, replace=False))


def _purer_round(ex, ml, r: int, shares: list[list[int]], entries, loss_cfg: dict) -> dict:
    t0 = time.perf_counter()
    rows = ex.get(ex.call(ml, "purer_rows", {t: entries[t].global_classes for s in shares for t in s}))
    parts = ex.map_pool("purer_grads", r, [{t: rows[t] for t in s} for s in shares], loss_cfg)
    grads = {t: g for part in parts for t, g in part.items()}
    out = ex.get(ex.call(ml, "purer_step", r, grads))
    out["time/synthesis_s"] = time.perf_counter() - t0
    for t in grads:
        key = f"teachers/{entries[t].record.arch}"
        out[key] = out.get(key, 0.0) + 1.0
    return out


def run_summary(cfg: ExperimentConfig, trained: dict, t_start: float, run_dir: Path) -> dict:
    """The results.json fields that describe the run itself (shared by launch.py and Tune trials)."""
    return {"scenario": cfg.scenario, "method": cfg.method, "profile": cfg.profile, "seed": cfg.seed,
            "wall_s": round(time.time() - t_start, 1), "meta_updates": trained["meta_updates"],
            "best_val": trained["best_val"], "best_round": trained["best_round"],
            "actors_replaced": trained["actors_replaced"], "run_dir": str(run_dir)}


def run_dir_for(cfg: ExperimentConfig, resume: bool = False) -> Path:
    """The run directory of ``cfg`` (``cfg.out`` or the default), checked against ``resume``:
    a fresh run refuses a finished directory, a resumed one needs its checkpoint."""
    run_dir = Path(cfg.out).resolve() if cfg.out else default_run_dir(cfg).resolve()
    if not resume and (run_dir / "results.json").exists():
        raise UserError(f"--out {run_dir}: a finished run is already there; choose another --out or delete it")
    if resume and not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"--resume: no checkpoint at {run_dir / CHECKPOINT}")
    return run_dir


def prepare_experiment(cfg: ExperimentConfig, resume: bool = False, progress: bool = True) -> list:
    """Data on disk, Ray started (when ``runtime.workers > 0``) and the teacher pool: what every
    method run on ``cfg``'s scenario shares. Returns the pool's entries."""
    from .pool import pool_datasets

    data_root = Path(cfg.data.data_root).resolve()
    for dataset in pool_datasets(cfg):          # md: every domain (data.dataset is domains[0])
        ensure_dataset(data_root, dataset)
    if cfg.runtime.workers > 0:
        from .cluster import ensure_ray

        ensure_ray(address=cfg.runtime.address)
    return existing_pool(cfg) if resume else prepare_pool(cfg, cfg.runtime.workers, progress)


def run_method(cfg: ExperimentConfig, run_dir: Path, entries, resume: bool = False, progress: bool = True,
               evaluate=None, t_start: float | None = None) -> dict:
    """Train ``cfg.method`` on a prepared pool, meta-test it and write its run directory (results.json
    last). ``evaluate(cfg, trained, entries, progress)`` returns the results fields of the meta-test
    (default :func:`raydfml.baselines.evaluate_final`: the method and all its baselines)."""
    from ..baselines import evaluate_final
    from ..report import RunReport

    t_start = time.time() if t_start is None else t_start
    evaluate = evaluate_final if evaluate is None else evaluate
    report = RunReport(run_dir, cfg.to_dict(), resume=resume)
    try:
        trained = train(cfg, run_dir, report, resume=resume, progress=progress, entries=entries)
        results = evaluate(cfg, trained, entries, progress=progress)
        results.update(run_summary(cfg, trained, t_start, run_dir))
        report.finish(results)
    finally:
        report.close()
    return results


def run_experiment(cfg: ExperimentConfig, resume: bool = False, progress: bool = True) -> dict:
    """Everything ``launch.py`` does for one experiment; returns the results dict also written to disk."""
    t_start = time.time()
    seed_everything(cfg.seed)
    run_dir = run_dir_for(cfg, resume)
    entries = prepare_experiment(cfg, resume, progress)
    return run_method(cfg, run_dir, entries, resume=resume, progress=progress, t_start=t_start)
