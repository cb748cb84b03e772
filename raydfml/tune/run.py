"""The sweep's entry point: prepare data and teacher pools once, then run (or restore) the Tune
experiment and write its results table."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..utils import atomic_path
from .results import write_results
from .search import _trial_dirname, build_scheduler, build_search_alg, checkpoints_to_keep, param_space, trial_shares
from .sweep import Sweep, _absolute_paths, _resolve_point, load_sweep, trial_points
from .trainable import make_trainable

SWEEP_JSON = "sweep.json"
DEFAULT_STORAGE = "runs/tune"


def prebuild_pools(sweep: Sweep, fixed: dict[str, Any], progress: bool = True) -> list[str]:
    """Generate the datasets and train every teacher zoo the sweep needs, once, before any trial."""
    import ray

    from ..data.layout import ensure_dataset
    from ..runtime.pool import pool_datasets, pool_zoos, prepare_pool

    seen: dict[str, Any] = {}
    for point in trial_points(sweep):
        cfg = _resolve_point(sweep, point, fixed)
        key = json.dumps([cfg.data.dataset, cfg.data.domains, cfg.data.data_root, cfg.data.image_size,
                          dataclasses.asdict(cfg.pool)], sort_keys=True, default=str)
        seen.setdefault(key, cfg)
    workers = max(1, min(4, int(ray.cluster_resources().get("CPU", 1))))
    built = []
    for cfg in seen.values():
        for dataset in pool_datasets(cfg):         # md: every domain
            ensure_dataset(Path(cfg.data.data_root), dataset, progress)
        prepare_pool(cfg, workers, progress)
        built += [str(zoo_dir) for _, zoo_dir, _ in pool_zoos(cfg)]
    return sorted(set(built))


def _user_parts(sweep: Sweep, fixed: dict[str, Any]) -> list:
    """Methods, rules and synthesizers of the sweep registered outside the package (sent to the trials)."""
    from ..plugins import user_parts

    parts = {}
    for point in trial_points(sweep):
        for kind, name, obj in user_parts(_resolve_point(sweep, point, fixed)):
            parts[(kind, name)] = (kind, name, obj)
    return list(parts.values())


def _sweep_differences(stored: dict, now: dict) -> list[str]:
    """``key: old there, new now`` for each option of the sweep that differs (flattened)."""
    from ..config import flatten

    a, b = flatten(json.loads(json.dumps(stored, default=str))), flatten(json.loads(json.dumps(now, default=str)))
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def run_sweep(path: str, num_samples: int | None = None, storage: str | None = None, resume: bool = False,
              address: str | None = None, quiet: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or ``resume``) the sweep in ``path``; returns {"table", "best", "experiment_path", "complete", ...}.

    ``overrides`` (``--set``, ``--data-root``, ...) are added to the sweep file's fixed ``set:`` values.
    """
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from ..cluster import cluster_gpus, ensure_ray

    sweep = load_sweep(path, overrides)
    if num_samples is not None:
        if num_samples < 1:
            raise UserError(f"--num-samples {num_samples}: must be at least 1")
        sweep.num_samples = int(num_samples)
    storage_path = Path(storage or sweep.storage or DEFAULT_STORAGE).expanduser().resolve()
    exp_path = storage_path / sweep.name
    if resume:
        if not tune.Tuner.can_restore(str(exp_path)):
            raise UserError(f"--resume: no sweep to resume in {exp_path}")
        try:
            stored = json.loads((exp_path / SWEEP_JSON).read_text())
        except (OSError, ValueError):
            raise UserError(f"--resume: {exp_path / SWEEP_JSON} is missing or unreadable") from None
        diff = _sweep_differences(stored["sweep"], sweep.to_dict())
        if diff:
            raise UserError(f"--resume: sweep {sweep.name!r} was started with other options ({'; '.join(diff[:2])}"
                            f"{f' and {len(diff) - 2} more' if len(diff) > 2 else ''}); resume it unchanged or "
                            "start a new one with another --storage")
        sweep = Sweep.from_dict(stored["sweep"])
    elif tune.Tuner.can_restore(str(exp_path)):
        raise UserError(f"--storage {storage_path}: sweep {sweep.name!r} already exists there; "
                        f"pass --resume to continue it, or choose another --storage")
    # Checkpoints every round with num_to_keep force an experiment-state snapshot each time: cheap on a
    # local disk, so Tune's warning about it is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ensure_ray(address=address)
    # a resumed sweep keeps the absolute paths it started with (not re-resolved against today's directory)
    fixed = stored["fixed"] if resume else _absolute_paths(sweep.fixed)
    if not quiet:
        print(f"sweep {sweep.name}: preparing data and teacher pools", flush=True)
    prebuild_pools(sweep, fixed, progress=not quiet)
    shares = trial_shares(sweep, cluster_gpus())
    base = {"sweep": sweep.to_dict(), "fixed": fixed, "shares": shares, "experiment_path": str(exp_path),
            "parts": _user_parts(sweep, fixed)}
    trainable = make_trainable(base)
    t0 = time.time()
    if resume:
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        exp_path.mkdir(parents=True, exist_ok=True)
        with atomic_path(exp_path / SWEEP_JSON) as tmp:
            tmp.write_text(json.dumps({"sweep": sweep.to_dict(), "fixed": fixed, "shares": shares}, indent=2,
                                      default=str))
        alg = build_search_alg(sweep)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                max_concurrent_trials=None if isinstance(alg, BasicVariantGenerator) else sweep.max_concurrent_trials,
                scheduler=build_scheduler(sweep), search_alg=alg, time_budget_s=sweep.time_budget_s,
                trial_dirname_creator=_trial_dirname,
                reuse_actors=True),          # the next trial reuses a finished trial's process (and imports)
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=str(storage_path), verbose=0 if quiet else 1,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=checkpoints_to_keep(sweep)),
                failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    del grid        # the table is read back from disk, where interrupted trials are PENDING (not TERMINATED)
    wall = time.time() - t0
    out = write_results(sweep, exp_path, quiet=quiet)
    table = out["table"]
    unfinished = [] if table.empty else table.loc[table["status"] == "unfinished", "trial_id"].tolist()
    errors = 0 if table.empty else int((table["status"] == "error").sum())
    out.update(experiment_path=str(exp_path), complete=not unfinished, wall_s=round(wall, 1), errors=errors)
    if not quiet:
        print(f"sweep wall time {wall:.0f}s; {len(table)} trials, {errors} errored")
        if unfinished:
            print(f"sweep interrupted with {len(unfinished)} trials unfinished; continue it with:\n"
                  f"  python launch.py --tune {path} --storage {storage_path} --resume")
    return out
