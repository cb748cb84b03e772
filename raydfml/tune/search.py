"""Tune objects from a ``Sweep``: the parameter space, the trial's placement group, the scheduler and
the search algorithm (chosen by name; optional backends are imported only when asked for)."""
from __future__ import annotations

import math
from typing import Any

from ..errors import UserError
from .sweep import (CATEGORICAL, DIMENSIONS, Sweep, _absolute_paths, _resolve_point, _spec_kind, _unknown,
                    _values_of, trial_points)

# search algorithm -> (module it needs, pyproject extra that installs it)
SEARCH_EXTRAS = {"optuna": ("optuna", "optuna"), "hyperopt": ("hyperopt", "hyperopt")}
SEARCH_PACKAGES = {"ax": "ax-platform", "bayesopt": "bayesian-optimization==1.4.3", "bohb": "hpbandster ConfigSpace",
                   "nevergrad": "nevergrad", "zoopt": "zoopt", "hebo": "HEBO"}


def _domain(kind: str, args: Any):
    from ray import tune

    if kind == "value":
        return args
    if kind == "grid":
        return tune.grid_search(list(args))
    return getattr(tune, kind)(*args)


def param_space(sweep: Sweep) -> dict[str, Any]:
    space = {k: getattr(sweep, k) for k in ("scenario", "method", "profile")}
    for key, spec in sweep.space.items():
        space[key] = _domain(*_spec_kind(key, spec, sweep.source))
    return space


def trial_shares(sweep: Sweep, cluster_gpus: float) -> dict[str, float]:
    """CPU and GPU per bundle of a trial's placement group (trial bundle + one per actor)."""
    res = sweep.resources
    workers = int(res["workers"])
    n_actors = workers + 1 if workers > 0 else 0
    g = res["gpus_per_trial"]
    if g == "auto":
        conc = int(sweep.max_concurrent_trials or 1)
        g = min(1.0, cluster_gpus / conc) if cluster_gpus > 0 else 0.0
    share = math.floor(float(g) / (n_actors + 1) * 1e4) / 1e4 if g else 0.0
    return {"workers": workers, "trial_cpus": float(res["trial_cpus"]), "actor_cpus": float(res["actor_cpus"]),
            "gpu_share": share, "n_actors": n_actors}


def placement_group(shares: dict[str, float]):
    from ray import tune

    def bundle(cpus: float) -> dict[str, float]:
        b = {"CPU": cpus}
        if shares["gpu_share"] > 0:
            b["GPU"] = shares["gpu_share"]
        return b

    return tune.PlacementGroupFactory([bundle(shares["trial_cpus"])]
                                      + [bundle(shares["actor_cpus"]) for _ in range(int(shares["n_actors"]))])


def _max_rounds(sweep: Sweep) -> tuple[int, int]:
    """(most rounds, smallest eval_every) over the sweep's trial configurations."""
    fixed = _absolute_paths(sweep.fixed)
    cfgs = [_resolve_point(sweep, p, fixed) for p in trial_points(sweep, limit=512)]
    rounds = max(c.train.rounds for c in cfgs)
    if "train.rounds" in sweep.space and _values_of(sweep, "train.rounds") is None:
        rounds = max(rounds, int(_spec_kind("train.rounds", sweep.space["train.rounds"], "")[1][1]))
    return rounds, min(c.train.eval_every for c in cfgs)


def build_scheduler(sweep: Sweep):
    from ray.tune import schedulers as S

    opts = {k: v for k, v in sweep.scheduler.items() if k != "name"}
    name = str(sweep.scheduler.get("name", "asha")).lower()
    rounds, eval_every = _max_rounds(sweep)
    try:
        if name == "asha":
            opts.setdefault("time_attr", "training_iteration")
            opts.setdefault("max_t", rounds)
            opts.setdefault("grace_period", eval_every)          # decision points where val_acc is fresh
            opts.setdefault("reduction_factor", 2)
            return S.ASHAScheduler(**opts)
        if name == "hyperband":
            opts.setdefault("time_attr", "training_iteration")
            opts.setdefault("max_t", rounds)
            return S.HyperBandScheduler(**opts)
        if name == "median":
            opts.setdefault("time_attr", "training_iteration")
            opts.setdefault("grace_period", eval_every)
            return S.MedianStoppingRule(**opts)
        if name == "pbt":
            opts.setdefault("time_attr", "training_iteration")
            opts.setdefault("perturbation_interval", eval_every)
            muts = opts.pop("mutations", None)
            if muts is None:     # default: every non-grid dimension of the space
                muts = {k: v for k, v in sweep.space.items()
                        if k not in DIMENSIONS and _spec_kind(k, v, "")[0] not in ("grid", "value")}
            if not muts:
                raise UserError(f"{sweep.source}: scheduler pbt needs mutations (or non-grid space entries)")
            hm = {}
            for k, v in muts.items():
                kind, args = _spec_kind(k, v, sweep.source)
                hm[k] = list(args) if kind in CATEGORICAL else _domain(kind, args)
            return S.PopulationBasedTraining(hyperparam_mutations=hm, **opts)
        return S.FIFOScheduler()
    except TypeError as exc:
        raise UserError(f"{sweep.source}: scheduler {name}: {exc}") from None


def build_search_alg(sweep: Sweep):
    """The search algorithm by name; optional backends are imported only when asked for."""
    import importlib.util

    opts = {k: v for k, v in sweep.search_alg.items() if k != "name"}
    name = str(sweep.search_alg.get("name", "basic")).lower()
    if name in ("basic", "variant", "basic_variant"):
        from ray.tune.search import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a generator instance: the generator enforces it itself.
        opts.setdefault("max_concurrent", int(sweep.max_concurrent_trials or 0))
        return BasicVariantGenerator(**opts)
    if name in SEARCH_EXTRAS:
        module, extra = SEARCH_EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"search_alg {name!r} needs the {module} package: pip install -e \".[{extra}]\"")
    from ray.tune.search import SEARCH_ALG_IMPORT, create_searcher

    if name not in SEARCH_ALG_IMPORT:
        raise _unknown("search_alg", name, ["basic", *SEARCH_ALG_IMPORT], sweep.source)
    try:
        return create_searcher(name, **opts)
    except ImportError as exc:
        pkg = SEARCH_PACKAGES.get(name, name)
        raise UserError(f"search_alg {name!r} needs an optional package: pip install {pkg} ({exc})") from None
    except (AssertionError, TypeError, ValueError) as exc:
        raise UserError(f"search_alg {name!r}: {exc}") from None


def checkpoints_to_keep(sweep: Sweep) -> int:
    """Per trial. PBT restores other trials' checkpoints while they keep reporting: keep more of them."""
    if sweep.checkpoints_to_keep is not None:
        return max(1, int(sweep.checkpoints_to_keep))
    return 10 if str(sweep.scheduler.get("name", "")).lower() == "pbt" else 2


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"
