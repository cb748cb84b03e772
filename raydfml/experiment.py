"""One experiment end to end, above the runtime: what ``launch.py``, a comparison and a Tune trial share.

data -> teacher pool -> the runtime's round loop (:func:`raydfml.runtime.driver.train`) -> final
seeded meta-test with baselines -> a complete run directory (``results.json`` written last).
``run_method`` takes a ``reporter`` called after every round, which is how a Tune trial reports and
checkpoints while running exactly the loop ``launch.py`` runs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .config import ExperimentConfig
from .data.layout import ensure_dataset
from .diagnostics import class_coverage, gain_recovered, provenance
from .errors import UserError
from .artifact import save_meta_model
from .faults import maybe_fail
from .rundir import RunLock, check_run_dir, default_run_dir
from .report import RESULTS_FILE
from .runtime.driver import train
from .runtime.pool import existing_pool, pool_datasets, prepare_pool
from .utils import seed_everything


def run_dir_for(cfg: ExperimentConfig, resume: bool = False) -> Path:
    """The run directory of ``cfg`` (``cfg.out`` or the default), checked against ``resume``
    (:func:`raydfml.rundir.check_run_dir`: a fresh run refuses any used directory, a resumed one
    needs its checkpoint and the options it was started with)."""
    run_dir = Path(cfg.out).resolve() if cfg.out else default_run_dir(cfg).resolve()
    check_run_dir(run_dir, cfg, resume)
    return run_dir


def run_summary(cfg: ExperimentConfig, trained: dict, t_start: float, run_dir: Path) -> dict:
    """The results.json fields that describe the run itself."""
    return {"scenario": cfg.scenario, "method": cfg.label, "profile": cfg.profile, "seed": cfg.seed,
            "wall_s": round(time.time() - t_start, 1), "meta_updates": trained["meta_updates"],
            "best_val": trained["best_val"], "best_round": trained["best_round"],
            "actors_replaced": trained["actors_replaced"], "run_dir": str(run_dir)}


def prepare_experiment(cfg: ExperimentConfig, resume: bool = False, progress: bool = True) -> list:
    """Data on disk, Ray started (when ``runtime.workers > 0``) and the teacher pool: what every
    method run on ``cfg``'s scenario shares. Returns the pool's entries."""
    from .runtime.parts import meta_split

    data_root = Path(cfg.data.data_root).resolve()
    real = cfg.train.source == "real"
    for dataset in pool_datasets(cfg):          # md: every domain (data.dataset is domains[0])
        ensure_dataset(data_root, dataset, progress)
        # read (and cached) now: a bad image fails before training
        for split in ("meta_train", "meta_val", "meta_test") if real else ("meta_val", "meta_test"):
            meta_split(cfg, dataset, split)
    if cfg.runtime.workers > 0:
        from .cluster import ensure_ray

        ensure_ray(address=cfg.runtime.address)
    if real:                                    # meta-training on real episodes needs no teachers
        return []
    entries = existing_pool(cfg) if resume else prepare_pool(cfg, cfg.runtime.workers, progress)
    _check_episode_way(cfg, entries)
    return entries


def _check_episode_way(cfg: ExperimentConfig, entries) -> None:
    """Replay draws ``learner.train_way`` classes per task from what the teachers cover: a pool that
    covers fewer would never replay, so it is an error before training."""
    from .baselines import pool_classes

    covered = sum(len(c) for c in pool_classes(cfg, entries).values())
    if cfg.learner.train_way and covered < cfg.learner.train_way:
        raise UserError(f"config learner.train_way={cfg.learner.train_way}: the teacher pool covers only "
                        f"{covered} classes, so no replay task could be drawn; lower it with "
                        f"--set learner.train_way={covered}")


def run_method(cfg: ExperimentConfig, run_dir: Path, entries, resume: bool = False, progress: bool = True,
               evaluate: Callable | None = None, t_start: float | None = None,
               reporter: Callable | None = None) -> dict:
    """Train ``cfg.method`` on a prepared pool, meta-test it and write its run directory (results.json
    last). ``evaluate(cfg, trained, entries, progress)`` returns the results fields of the meta-test
    (default :func:`raydfml.baselines.evaluate_final`: the method and all its baselines).
    ``reporter(round, metrics, executor)`` is called after every round's checkpoint."""
    from .baselines import evaluate_final
    from .report import RunReport

    t_start = time.time() if t_start is None else t_start
    evaluate = evaluate_final if evaluate is None else evaluate
    with RunLock(run_dir):                       # one process writes a run directory at a time
        return _run_locked(cfg, run_dir, entries, resume, progress, evaluate, t_start, reporter, RunReport)


def _run_locked(cfg, run_dir, entries, resume, progress, evaluate, t_start, reporter, RunReport) -> dict:
    report = RunReport(run_dir, cfg.to_dict(), resume=resume)
    try:
        trained = train(cfg, run_dir, report, resume=resume, progress=progress, entries=entries,
                        on_round_end=reporter)
        save_meta_model(run_dir, trained["best_params"], cfg)      # model.pt + model.json, before results
        maybe_fail("mid_meta_test")
        results = evaluate(cfg, trained, entries, progress=progress)
        results.update(run_summary(cfg, trained, t_start, run_dir))
        results["source"] = cfg.train.source
        if entries:
            results["coverage"] = class_coverage(cfg, entries)
        results.update(trained.get("method_report") or {})   # a method's own fields (bidf: "queries")
        if trained.get("weights"):
            results["weights"] = trained["weights"]      # each weighted key's final 1/w^2 (mean 1)
        results["provenance"] = provenance(cfg, entries)
        if results.get("meta_test"):
            results["recovered"] = gain_recovered(results["meta_test"], results.get("baselines") or {})
        report.finish(results)
    finally:
        report.close()
    return results


def run_experiment(cfg: ExperimentConfig, resume: bool = False, progress: bool = True) -> dict:
    """Everything ``launch.py`` does for one experiment; returns the results dict also written to disk."""
    t_start = time.time()
    seed_everything(cfg.seed)
    run_dir = run_dir_for(cfg, resume)
    if resume and (run_dir / RESULTS_FILE).is_file():      # finished earlier: nothing to redo, nothing deleted
        print(f"{run_dir}: this run finished earlier; its results are in {run_dir / RESULTS_FILE}", flush=True)
        return json.loads((run_dir / RESULTS_FILE).read_text())
    entries = prepare_experiment(cfg, resume, progress)
    return run_method(cfg, run_dir, entries, resume=resume, progress=progress, t_start=t_start)


__all__ = ["default_run_dir", "prepare_experiment", "run_dir_for", "run_experiment", "run_method", "run_summary"]
