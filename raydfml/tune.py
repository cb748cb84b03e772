"""Ray Tune sweeps over raydfml experiments: ``python launch.py --tune tune_configs/<name>.yaml``.

A sweep file (YAML) names the experiments to compare and how to search them::

    name: lr-deepinv                 # experiment directory: <storage>/<name> (default: the file's stem)
    scenario: mr                     # defaults of the three presets (each may also be a space dimension)
    method: deepinv
    profile: quick
    set:                             # fixed config overrides (dotted keys, as --set)
      train.baselines: []
    space:                           # the search space: dotted config keys, scenario, method, profile, seed
      method: {grid: [deepinv, purer]}
      learner.outer_lr: {loguniform: [1.0e-4, 1.0e-2]}
      learner.inner_lr: {choice: [0.01, 0.05]}
    num_samples: 1                   # samples per grid point (--num-samples overrides)
    metric: val_acc                  # meta-val accuracy: the only selection signal (test stays untouched)
    mode: max
    max_concurrent_trials: 2
    scheduler: {name: asha, grace_period: 5, reduction_factor: 2}     # asha (default) | pbt | hyperband | median | fifo
    search_alg: {name: basic}        # basic (default) | optuna | hyperopt | any name tune.create_searcher knows
    resources:                       # one placement group per trial: a bundle for the trial, one per actor
      workers: 1                     # TeacherPool actors per trial (0: everything inside the trial process)
      trial_cpus: 0.25               # the trial process (round loop, final meta-test)
      actor_cpus: 0.35               # each TeacherPool actor and the MetaLearner actor
      gpus_per_trial: auto           # auto: the cluster's GPUs / max_concurrent_trials (0 without GPUs)

Space entries are ``{grid: [...]}``, ``{choice: [...]}`` (for scenario, method and profile also
``{grid: all}``: every preset raydfml.config registers), ``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}``, ``{quniform: [lo, hi, q]}``, ``{qloguniform: [lo, hi, q]}``,
``{randint: [lo, hi]}``, ``{qrandint: [lo, hi, q]}``, ``{lograndint: [lo, hi]}`` or a plain value.

Every trial runs the real engine (:func:`raydfml.runtime.driver.train`): its actors are created
inside the trial's placement group, every round reports its metrics and a checkpoint with
``tune.report`` (``val_acc`` is the last meta-val accuracy: ``NaN`` before the first evaluation, so
the schedulers' decision points are aligned to ``train.eval_every``), an interrupted sweep resumes with
``Tuner.restore`` (``--resume``), and the last report carries the final meta-test (1-shot and 5-shot
accuracy with 95% CI). At the end ``trials.csv`` / ``trials.md`` (one row per trial) and
``best.json`` are written next to Tune's own files, and the best configuration is printed.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

DIMENSIONS = ("scenario", "method", "profile", "seed")       # space keys that are not dotted config keys
SPACE_KINDS = {"grid": None, "choice": None, "uniform": 2, "loguniform": 2, "quniform": 3, "qloguniform": 3,
               "randint": 2, "qrandint": 3, "lograndint": 2}
CATEGORICAL = ("grid", "choice")
SCHEDULERS = ("asha", "pbt", "hyperband", "median", "fifo")
# search algorithm -> (module it needs, pyproject extra that installs it)
SEARCH_EXTRAS = {"optuna": ("optuna", "optuna"), "hyperopt": ("hyperopt", "hyperopt")}
SEARCH_PACKAGES = {"ax": "ax-platform", "bayesopt": "bayesian-optimization==1.4.3", "bohb": "hpbandster ConfigSpace",
                   "nevergrad": "nevergrad", "zoopt": "zoopt", "hebo": "HEBO"}
TABLE_CSV, TABLE_MD, BEST_JSON, SWEEP_JSON = "trials.csv", "trials.md", "best.json", "sweep.json"
DEFAULT_STORAGE = "runs/tune"


@dataclass
class Sweep:
    """A parsed sweep file. ``fixed`` and ``space`` keys are dotted config keys (plus DIMENSIONS in ``space``)."""
    name: str
    source: str = ""
    description: str = ""
    scenario: str = "mr"
    method: str = "deepinv"
    profile: str = "quick"
    seed: int = 0
    fixed: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    metric: str = "val_acc"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent_trials: int | None = 2
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    search_alg: dict[str, Any] = field(default_factory=lambda: {"name": "basic"})
    resources: dict[str, Any] = field(default_factory=dict)
    checkpoints_to_keep: int | None = None     # None: 2, or 10 with PBT (exploited checkpoints must survive)
    time_budget_s: float | None = None
    storage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sweep":
        return cls(**d)


FILE_KEYS = {"name", "description", "scenario", "method", "profile", "seed", "set", "space", "metric", "mode",
             "num_samples", "max_concurrent_trials", "scheduler", "search_alg", "resources",
             "checkpoints_to_keep", "time_budget_s", "storage"}
RESOURCE_KEYS = {"workers": 1, "trial_cpus": 0.5, "actor_cpus": 1.0, "gpus_per_trial": "auto"}


def _unknown(kind: str, key: str, allowed, where: str) -> UserError:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(allowed))}"
    return UserError(f"{where}: unknown {kind} {key!r}{hint}")


# ----------------------------------------------------------------------------- sweep files
def load_sweep(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and check a sweep file (every trial configuration it can produce must resolve);
    ``overrides`` are added to its ``set:`` values."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--tune {path}: no such sweep file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"--tune {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"--tune {path}: expected a mapping of sweep settings")
    where = str(path)
    for key in raw:
        if key not in FILE_KEYS:
            raise _unknown("sweep setting", str(key), FILE_KEYS, where)
    kw: dict[str, Any] = {k: raw[k] for k in raw if k not in ("set", "space", "resources", "scheduler", "search_alg")}
    kw["name"] = str(raw.get("name") or p.stem)
    kw["source"] = str(p.resolve())
    kw["fixed"] = {**dict(raw.get("set") or {}), **dict(overrides or {})}
    kw["space"] = _expand_all(dict(raw.get("space") or {}))
    for key in ("scheduler", "search_alg"):
        val = raw.get(key)
        if val is None:
            continue
        kw[key] = {"name": val} if isinstance(val, str) else dict(val)
    res = dict(raw.get("resources") or {})
    for key in res:
        if key not in RESOURCE_KEYS:
            raise _unknown("resources setting", key, RESOURCE_KEYS, where)
    kw["resources"] = {**RESOURCE_KEYS, **res}
    sweep = Sweep(**kw)
    check_sweep(sweep, where)
    return sweep


def _expand_all(space: dict[str, Any]) -> dict[str, Any]:
    """``{grid: all}`` / ``{choice: all}`` for scenario, method or profile: every registered preset,
    so a comparison sweep picks up methods and scenarios as they are added to raydfml.config."""
    from .config import METHODS, PROFILES, SCENARIOS

    registry = {"scenario": SCENARIOS, "method": METHODS, "profile": PROFILES}
    out = dict(space)
    for key, reg in registry.items():
        spec = out.get(key)
        if isinstance(spec, dict) and len(spec) == 1:
            kind, args = next(iter(spec.items()))
            if kind in CATEGORICAL and args == "all":
                out[key] = {kind: list(reg)}
    return out


def _absolute_paths(fixed: dict[str, Any]) -> dict[str, Any]:
    """Trials run in other processes (and directories): every path they get is absolute."""
    out = dict(fixed)
    out["data.data_root"] = str(Path(out.get("data.data_root", "data")).expanduser().resolve())
    if out.get("pool.zoo_dir"):
        out["pool.zoo_dir"] = str(Path(out["pool.zoo_dir"]).expanduser().resolve())
    return out


def _spec_kind(key: str, spec: Any, where: str) -> tuple[str, Any]:
    """("value", v) for a plain value, else (kind, args) of a ``{kind: args}`` entry."""
    if isinstance(spec, dict):
        if len(spec) != 1:
            raise UserError(f"{where}: space entry {key!r} must be one of {{grid|choice|uniform|...: values}}, got {spec}")
        kind, args = next(iter(spec.items()))
        if kind not in SPACE_KINDS:
            raise _unknown(f"space kind for {key!r}:", str(kind), SPACE_KINDS, where)
        if not isinstance(args, list) or not args:
            raise UserError(f"{where}: space entry {key!r}: {kind} needs a non-empty list, got {args!r}")
        n = SPACE_KINDS[kind]
        if n is not None and len(args) != n:
            raise UserError(f"{where}: space entry {key!r}: {kind} takes {n} numbers, got {args}")
        if n is not None and not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise UserError(f"{where}: space entry {key!r}: {kind} bounds must be numbers, got {args}")
        return kind, list(args)
    if isinstance(spec, list):
        raise UserError(f"{where}: space entry {key!r}: write {{grid: {spec}}} or {{choice: {spec}}}")
    return "value", spec


def _values_of(sweep: Sweep, key: str) -> list[Any] | None:
    """The values a categorical (or fixed) dimension takes; None for a continuous one."""
    if key not in sweep.space:
        return [getattr(sweep, key)] if key in DIMENSIONS else None
    kind, args = _spec_kind(key, sweep.space[key], sweep.source)
    if kind == "value":
        return [args]
    if kind in CATEGORICAL:
        return list(args)
    return None


def _sample_value(kind: str, args: Any) -> Any:
    if kind == "value":
        return args
    if kind in CATEGORICAL:
        return args[0]
    lo = args[0]
    return int(lo) if "randint" in kind else lo


def trial_points(sweep: Sweep, limit: int = 4096) -> list[dict[str, Any]]:
    """Every combination of the categorical dimensions (continuous ones at their lower bound)."""
    keys, choices = [], []
    for key, spec in sweep.space.items():
        kind, args = _spec_kind(key, spec, sweep.source)
        keys.append(key)
        choices.append(list(args) if kind in CATEGORICAL else [_sample_value(kind, args)])
    points = []
    for combo in itertools.product(*choices):
        points.append(dict(zip(keys, combo)))
        if len(points) >= limit:
            break
    return points


def check_sweep(sweep: Sweep, where: str) -> None:
    from .config import METHODS, PROFILES, SCENARIOS

    if sweep.mode not in ("max", "min"):
        raise UserError(f"{where}: mode {sweep.mode!r}: choose max or min")
    if not isinstance(sweep.num_samples, int) or sweep.num_samples < 1:
        raise UserError(f"{where}: num_samples {sweep.num_samples!r}: must be a positive integer")
    if sweep.max_concurrent_trials is not None and int(sweep.max_concurrent_trials) < 1:
        raise UserError(f"{where}: max_concurrent_trials must be at least 1 (or null for no limit)")
    for key, reg in (("scenario", SCENARIOS), ("method", METHODS), ("profile", PROFILES)):
        for v in _values_of(sweep, key) or []:
            if v not in reg:
                raise UserError(f"{where}: {key} {v!r}: choose one of {', '.join(reg)}")
        if key in sweep.space and _values_of(sweep, key) is None:
            raise UserError(f"{where}: space entry {key!r} must be a grid or a choice")
    for key in sweep.space:
        if key not in DIMENSIONS and "." not in key:
            raise UserError(f"{where}: space entry {key!r}: use a dotted config key (e.g. learner.inner_lr) "
                            f"or one of {', '.join(DIMENSIONS)}")
        if key.startswith(("pool.", "data.")) and _values_of(sweep, key) is None:
            raise UserError(f"{where}: space entry {key!r}: teacher pools are built before the sweep, so "
                            "pool.* and data.* keys can only take grid or choice values")
    for key in sweep.fixed:
        if key in DIMENSIONS:
            raise UserError(f"{where}: set: {key!r} is a top-level setting, not a --set override")
        if key.startswith("runtime.") and key != "runtime.device":
            raise UserError(f"{where}: set: {key!r}: trial resources are set under 'resources:'")
    sched = str(sweep.scheduler.get("name", "asha")).lower()
    if sched not in SCHEDULERS:
        raise _unknown("scheduler", sched, SCHEDULERS, where)
    alg = str(sweep.search_alg.get("name", "basic")).lower()
    if alg not in ("basic", "variant") and any(_spec_kind(k, v, where)[0] == "grid" for k, v in sweep.space.items()):
        raise UserError(f"{where}: search_alg {alg!r} cannot expand grid entries; use choice (or search_alg basic)")
    res = sweep.resources
    try:
        workers = int(res["workers"])
        cpus = float(res["trial_cpus"]), float(res["actor_cpus"])
    except (TypeError, ValueError):
        raise UserError(f"{where}: resources: workers must be an integer, trial_cpus/actor_cpus numbers") from None
    if workers < 0 or min(cpus) <= 0:
        raise UserError(f"{where}: resources: workers must be >= 0 and the CPU shares > 0")
    g = res["gpus_per_trial"]
    if g != "auto" and (not isinstance(g, (int, float)) or g < 0):
        raise UserError(f"{where}: resources: gpus_per_trial must be auto or a number >= 0")
    fixed = _absolute_paths(sweep.fixed)
    for point in trial_points(sweep, limit=512):
        try:
            _resolve_point(sweep, point, fixed)
        except UserError as exc:
            raise UserError(f"{where}: trial {point}: {exc}") from None


def _resolve_point(sweep: Sweep, point: dict[str, Any], fixed: dict[str, Any]):
    from .config import resolve

    overrides = dict(fixed)
    overrides.update({k: v for k, v in point.items() if k not in DIMENSIONS})
    seed = point.get("seed", sweep.seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"seed {seed!r}: must be an integer")
    return resolve(str(point.get("scenario", sweep.scenario)), str(point.get("method", sweep.method)),
                   str(point.get("profile", sweep.profile)), overrides, seed=seed)


# ----------------------------------------------------------------------------- Tune objects
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


# ----------------------------------------------------------------------------- the trainable
def _tune_key(key: str) -> str:
    return key.replace("/", "_")


def _trial_config(config: dict[str, Any], base: dict[str, Any]):
    sweep = Sweep.from_dict(base["sweep"])
    point = {k: v for k, v in config.items() if k in DIMENSIONS or "." in k}
    cfg = _resolve_point(sweep, point, base["fixed"])
    sh = base["shares"]
    cfg.runtime.workers = int(sh["workers"])
    cfg.runtime.actor_cpus = float(sh["actor_cpus"])
    cfg.runtime.actor_gpus = float(sh["gpu_share"])
    cfg.runtime.address = None          # the trial is already inside the sweep's Ray cluster
    cfg.runtime.pool_strategy = "default"   # an explicit strategy would leave the trial's placement group
    return cfg


def _config_into_checkpoint(path: Path, cfg) -> None:
    """Rewrite the optimisers' learning rates in a restored checkpoint to this trial's config.

    A checkpoint restored by PBT comes from another trial; the loaded optimiser state would silently
    keep that trial's learning rates instead of the mutated ones."""
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=True)
    meta = ck.get("meta", {})
    for group in meta.get("opt", {}).get("param_groups", []):
        group["lr"] = cfg.learner.outer_lr
    for group in (meta.get("purer") or {}).get("optimizer", {}).get("param_groups", []):
        group["lr"] = cfg.synth.purer_lr
    torch.save(ck, path)


def _placement_group_of(_actor=None) -> str | None:
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    return pg.id.hex() if pg is not None else None


def _actors_in_trial_group(executor) -> float:
    """Fraction of the executor's actors that run inside this trial's placement group (1.0 expected)."""
    import ray

    actors = [executor.meta, *executor.pools]
    if not hasattr(executor, "ray"):         # in-process executor: nothing to place
        return float("nan")
    mine = _placement_group_of()
    theirs = ray.get([a.__ray_call__.remote(_placement_group_of) for a in actors])
    return sum(t is not None and t == mine for t in theirs) / len(theirs)


def run_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial: the engine's round loop with a Tune report (and checkpoint) per round."""
    import torch
    from ray import tune

    from .baselines import evaluate_final
    from .report import RunReport
    from .runtime.driver import CHECKPOINT, run_summary, train
    from .runtime.pool import existing_pool
    from .utils import seed_everything

    torch.set_num_threads(max(1, int(base["shares"]["trial_cpus"])))
    cfg = _trial_config(config, base)
    ctx = tune.get_context()
    run_dir = Path(base["experiment_path"]) / f"trial_{ctx.get_trial_id()}" / "run"
    cfg.out = str(run_dir)
    seed_everything(cfg.seed)
    entries = existing_pool(cfg)          # built by the sweep's driver before any trial started
    state = {"last_val": float("nan"), "best_val": float("nan")}
    resume = False
    ck = tune.get_checkpoint()
    if ck is not None:
        with ck.as_directory() as d:
            (run_dir / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(d) / "last.pt", run_dir / CHECKPOINT)
            saved = json.loads((Path(d) / "trial_state.json").read_text())
            state.update({k: saved[k] for k in ("last_val", "best_val") if k in saved})
        _config_into_checkpoint(run_dir / CHECKPOINT, cfg)
        resume = True
    t0 = time.time()
    report = RunReport(run_dir, cfg.to_dict(), resume=resume)
    pending: dict[str, Any] = {}

    def tune_metrics(r: int, metrics: dict) -> dict[str, Any]:
        if "val/acc" in metrics:
            state["last_val"] = float(metrics["val/acc"])
        if "val/best" in metrics:
            state["best_val"] = float(metrics["val/best"])
        out = {_tune_key(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        out.update(round=r, rounds_done=r + 1, rounds=cfg.train.rounds, val_acc=state["last_val"],
                   best_val_acc=state["best_val"], final=False)
        return out

    def checkpoint_dir(r: int) -> str:
        d = tempfile.mkdtemp(prefix="raydfml-ck-")
        shutil.copyfile(run_dir / CHECKPOINT, Path(d) / "last.pt")
        (Path(d) / "trial_state.json").write_text(json.dumps({**state, "round": r}))
        return d

    def on_round_end(r: int, metrics: dict, executor) -> None:
        out = tune_metrics(r, metrics)
        if "in_pg" not in state:
            state["in_pg"] = _actors_in_trial_group(executor)
        out["actors_in_trial_pg"] = state["in_pg"]
        if r == cfg.train.rounds - 1:        # reported together with the final meta-test below
            pending.update(out, _ck=checkpoint_dir(r))
            return
        d = checkpoint_dir(r)
        try:
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    try:
        trained = train(cfg, run_dir, report, resume=resume, progress=False, entries=entries,
                        on_round_end=on_round_end)
        eval_cfg = copy.deepcopy(cfg)
        eval_cfg.runtime.workers = 0         # in this process: Ray tasks would not fit the trial's bundles
        results = evaluate_final(eval_cfg, trained, entries, progress=False)
        results.update(run_summary(cfg, trained, t0, run_dir))
        report.finish(results)
    finally:
        report.close()
    final = {k: v for k, v in pending.items() if k != "_ck"}
    for rec in results["meta_test"]:
        final[f"test_acc_{rec['shot']}shot"] = float(rec["accuracy"])
        final[f"test_ci95_{rec['shot']}shot"] = float(rec["ci95"])
    for name, recs in (results.get("baselines") or {}).items():
        for rec in recs or []:
            final[f"baseline_{name}_{rec['shot']}shot"] = float(rec["accuracy"])
    final.update(final=True, best_round=int(trained["best_round"]), meta_updates=int(trained["meta_updates"]))
    d = pending["_ck"]
    try:
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_trainable(base: dict[str, Any]):
    """The function trainable (a closure over the sweep) with its placement group attached."""
    from ray import tune

    def raydfml_trial(config):
        return run_trial(config, base)

    return tune.with_resources(raydfml_trial, placement_group(base["shares"]))


# ----------------------------------------------------------------------------- pools, results
def prebuild_pools(sweep: Sweep, fixed: dict[str, Any], progress: bool = True) -> list[str]:
    """Generate the datasets and train every teacher zoo the sweep needs, once, before any trial."""
    import ray

    from .data.layout import ensure_dataset
    from .runtime.pool import pool_datasets, pool_zoos, prepare_pool

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
            ensure_dataset(Path(cfg.data.data_root), dataset)
        prepare_pool(cfg, workers, progress)
        built += [str(zoo_dir) for _, zoo_dir, _ in pool_zoos(cfg)]
    return sorted(set(built))


def experiment_trials(exp_path: str | os.PathLike) -> list:
    """The sweep's trials as saved on disk (status, config, last result), oldest first."""
    import logging

    from ray.tune import ExperimentAnalysis

    lg = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = lg.level
    lg.setLevel(logging.ERROR)          # trials that never reported make it warn
    try:
        trials = ExperimentAnalysis(str(exp_path)).trials
    finally:
        lg.setLevel(level)
    return sorted(trials, key=lambda t: t.trial_id)


def _status(trial) -> str:
    m = trial.last_result or {}
    if trial.status == "ERROR":
        return "error"
    if m.get("final"):
        return "completed"
    if trial.status == "TERMINATED":
        return "stopped early" if m else "not started"
    return "unfinished"


def trials_table(trials, sweep: Sweep) -> tuple:
    """(numeric DataFrame for CSV, display DataFrame for Markdown): one row per trial, best first."""
    import pandas as pd

    dims = ["scenario", "method", "profile", *[k for k in sweep.space if k not in ("scenario", "method", "profile")]]
    rows = []
    for t in trials:
        m, c = dict(t.last_result or {}), dict(t.config or {})
        state = _status(t)
        row = {"trial_id": t.trial_id, **{d: c.get(d) for d in dims}, "status": state,
               "stopped_early": state == "stopped early",
               "rounds_done": m.get("rounds_done"), "rounds": m.get("rounds"),
               "val_acc": m.get("val_acc"), "best_val_acc": m.get("best_val_acc")}
        for k in sorted(m):
            if k.startswith(("test_acc_", "test_ci95_", "baseline_")):
                row[k] = m[k]
        row["wall_s"] = round(float(m["time_total_s"]), 1) if "time_total_s" in m else None
        row["trial_dir"] = t.path
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df, df
    shots = sorted({int(k[len("test_acc_"):-len("shot")]) for k in df.columns if k.startswith("test_acc_")})
    base_cols = sorted(k for k in df.columns if k.startswith("baseline_"))
    head = [c for c in df.columns if not c.startswith(("test_acc_", "test_ci95_", "baseline_"))
            and c not in ("wall_s", "trial_dir")]
    df = df[head + [x for s in shots for x in (f"test_acc_{s}shot", f"test_ci95_{s}shot")] + base_cols
            + ["wall_s", "trial_dir"]]
    key = sweep.metric if sweep.metric in df.columns else "val_acc"
    df = df.sort_values(by=[key], ascending=sweep.mode == "min", na_position="last", kind="stable")
    df = df.reset_index(drop=True)

    def num(v, fmt="{:.1f}"):
        return "n/a" if v is None or pd.isna(v) else fmt.format(v)

    show = pd.DataFrame({"trial": df["trial_id"]})
    for d in dims:
        show[d] = df[d].map(lambda v: f"{v:.3g}" if isinstance(v, float) else str(v))
    show["val acc"] = df["val_acc"].map(num)
    for s in shots:
        show[f"test 5-way {s}-shot"] = [num(a) if pd.isna(a) else f"{a:.1f} ± {ci:.1f}"
                                        for a, ci in zip(df[f"test_acc_{s}shot"], df[f"test_ci95_{s}shot"])]
    show["rounds"] = ["-" if pd.isna(a) else f"{a:.0f}/{b:.0f}" for a, b in zip(df["rounds_done"], df["rounds"])]
    show["wall s"] = df["wall_s"].map(lambda v: num(v, "{:.0f}"))
    show["status"] = df["status"]
    return df, show.set_index("trial")


def _launch_command(best_cfg: dict[str, Any], sweep: Sweep) -> str:
    sets = {**{k: v for k, v in sweep.fixed.items()}, **{k: v for k, v in best_cfg.items() if "." in k}}
    parts = ["python launch.py", f"--scenario {best_cfg.get('scenario', sweep.scenario)}",
             f"--method {best_cfg.get('method', sweep.method)}", f"--profile {best_cfg.get('profile', sweep.profile)}"]
    if "seed" in best_cfg:
        parts.append(f"--seed {best_cfg['seed']}")
    for k, v in sets.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        parts.append(f"--set {k}={v}")
    return " ".join(parts)


def write_results(sweep: Sweep, exp_path: Path, quiet: bool = False) -> dict[str, Any]:
    """trials.csv, trials.md and best.json in the experiment directory; prints the table and the best."""
    from .report import format_markdown
    from .utils import atomic_path

    trials = experiment_trials(exp_path)
    df, show = trials_table(trials, sweep)
    with atomic_path(exp_path / TABLE_CSV) as tmp:
        df.to_csv(tmp, index=False)
    best = None
    ok = df[df[sweep.metric].notna()] if not df.empty and sweep.metric in df.columns else df.iloc[0:0]
    if not ok.empty:
        i = ok[sweep.metric].idxmax() if sweep.mode == "max" else ok[sweep.metric].idxmin()
        row = ok.loc[i]
        config = dict(next(t for t in trials if t.trial_id == row["trial_id"]).config)
        best = {"trial_id": row["trial_id"], sweep.metric: float(row[sweep.metric]), "status": row["status"],
                "config": config,
                "test": {c: float(row[c]) for c in df.columns if c.startswith("test_") and not math.isnan(row[c])},
                "command": _launch_command(config, sweep), "trial_dir": row["trial_dir"]}
    lines = [f"# sweep {sweep.name}", "", f"{sweep.description}".strip(), "",
             format_markdown(show) if not show.empty else "(no trials)", "",
             f"val acc: last meta-val accuracy (%) the scheduler saw; test: final meta-test accuracy (%) ± 95% CI "
             f"of the model selected on meta-val; wall s: Tune's time_total_s of the trial."]
    if best:
        lines += ["", f"Best by {sweep.metric} ({sweep.mode}): trial {best['trial_id']}: "
                      + ", ".join(f"{k}={v}" for k, v in best["config"].items()),
                  "", f"    {best['command']}"]
    text = "\n".join(ln for ln in lines) + "\n"
    with atomic_path(exp_path / TABLE_MD) as tmp:
        tmp.write_text(text, encoding="utf-8")
    if best:
        with atomic_path(exp_path / BEST_JSON) as tmp:
            tmp.write_text(json.dumps(best, indent=2, default=str) + "\n", encoding="utf-8")
    if not quiet:
        print(("\n" + show.to_string()) if not show.empty else "no trials")
        if best:
            print(f"\nbest by {sweep.metric} ({sweep.mode}): trial {best['trial_id']} "
                  f"({sweep.metric}={best[sweep.metric]:.2f}; "
                  + ", ".join(f"{k}={v:.2f}" for k, v in best["test"].items()) + ")")
            print("  config: " + json.dumps(best["config"], default=str))
            print(f"  rerun:  {best['command']}")
        print(f"\ntable: {exp_path / TABLE_MD}  ({TABLE_CSV} alongside); "
              f"TensorBoard: tensorboard --logdir {exp_path}")
    return {"table": df, "best": best}


# ----------------------------------------------------------------------------- entry point
def run_sweep(path: str, num_samples: int | None = None, storage: str | None = None, resume: bool = False,
              address: str | None = None, quiet: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or ``resume``) the sweep in ``path``; returns {"table", "best", "experiment_path", "complete", ...}.

    ``overrides`` (``--set``, ``--data-root``, ...) are added to the sweep file's fixed ``set:`` values.
    """
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from .runtime.cluster import cluster_gpus, ensure_ray

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
        stored = json.loads((exp_path / SWEEP_JSON).read_text())
        if Sweep.from_dict(stored["sweep"]).space != sweep.space:
            print(f"note: {path} changed since the sweep started; resuming with the original sweep", flush=True)
        sweep = Sweep.from_dict(stored["sweep"])
    elif tune.Tuner.can_restore(str(exp_path)):
        raise UserError(f"--storage {storage_path}: sweep {sweep.name!r} already exists there; "
                        f"pass --resume to continue it, or choose another --storage")
    # Checkpoints every round with num_to_keep force an experiment-state snapshot each time: cheap on a
    # local disk, so Tune's warning about it is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ensure_ray(address=address)
    fixed = _absolute_paths(sweep.fixed)
    if not quiet:
        print(f"sweep {sweep.name}: preparing data and teacher pools", flush=True)
    prebuild_pools(sweep, fixed, progress=not quiet)
    shares = trial_shares(sweep, cluster_gpus())
    base = {"sweep": sweep.to_dict(), "fixed": fixed, "shares": shares, "experiment_path": str(exp_path)}
    trainable = make_trainable(base)
    t0 = time.time()
    if resume:
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        exp_path.mkdir(parents=True, exist_ok=True)
        (exp_path / SWEEP_JSON).write_text(json.dumps({"sweep": sweep.to_dict(), "fixed": fixed,
                                                       "shares": shares}, indent=2, default=str))
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
