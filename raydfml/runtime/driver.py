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

    pool_classes = sorted({c for e in entries for c in e.record.classes})
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
    bar = tqdm(range(start, tr.rounds), initial=start, total=tr.rounds, desc=f"{cfg.method} rounds",
               unit="round", disable=not progress)
    last_val = None
    for r in bar:
        t_round = time.perf_counter()
        tids = round_teachers(len(entries), tr.teachers_per_round, cfg.seed, r)
        shares = _shares(tids, ex.num_pools)
        metrics: dict[str, float] = {}
        if cfg.synth.name == "purer":
            metrics.update(_purer_round(ex, ml, r, shares, entries, purer_loss_cfg(cfg)))
        else:
            theta = ex.call(ml, "flat_params") if tr.kd_steps > 0 else None
            t0 = time.perf_counter()
            results = [it for part in ex.map_pool("recover", r, shares, theta) for it in part]
            metrics["time/synthesis_s"] = time.perf_counter() - t0
            ex.get(ex.call(ml, "add_recovered", results))
            if tr.kd_steps > 0:
                metrics.update(ex.get(ex.call(ml, "apply_teacher_grads", [it["grad"] for it in results], "mean")))
                metrics["kd/loss"] = float(np.mean([it["kd_loss"] for it in results]))
            metrics["synth/teacher_acc"] = float(np.mean([it["teacher_acc"] for it in results]))
            metrics["synth/inv_loss"] = float(np.mean([it["inv_loss"] for it in results]))
            metrics["synth/passes"] = float(sum(it["passes"] for it in results))
            for arch in sorted({it["arch"] for it in results}):
                metrics[f"teachers/{arch}"] = float(sum(it["arch"] == arch for it in results))
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


def _purer_round(ex, ml, r: int, shares: list[list[int]], entries, loss_cfg: dict) -> dict:
    t0 = time.perf_counter()
    rows = ex.get(ex.call(ml, "purer_rows", {t: entries[t].record.classes for s in shares for t in s}))
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


def run_experiment(cfg: ExperimentConfig, resume: bool = False, progress: bool = True) -> dict:
    """Everything ``launch.py`` does for one experiment; returns the results dict also written to disk."""
    from ..baselines import evaluate_final
    from ..report import RunReport

    t_start = time.time()
    seed_everything(cfg.seed)
    run_dir = Path(cfg.out).resolve() if cfg.out else default_run_dir(cfg).resolve()
    if not resume and (run_dir / "results.json").exists():
        raise UserError(f"--out {run_dir}: a finished run is already there; choose another --out or delete it")
    if resume and not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"--resume: no checkpoint at {run_dir / CHECKPOINT}")
    data_root = Path(cfg.data.data_root).resolve()
    ensure_dataset(data_root, cfg.data.dataset)
    if cfg.runtime.workers > 0:
        from .cluster import ensure_ray

        ensure_ray(address=cfg.runtime.address)
    entries = existing_pool(cfg) if resume else prepare_pool(cfg, cfg.runtime.workers, progress)
    report = RunReport(run_dir, cfg.to_dict(), resume=resume)
    try:
        trained = train(cfg, run_dir, report, resume=resume, progress=progress, entries=entries)
        results = evaluate_final(cfg, trained, entries, progress=progress)
        results.update(run_summary(cfg, trained, t_start, run_dir))
        report.finish(results)
    finally:
        report.close()
    return results
