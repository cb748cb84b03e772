"""Sweep files: the schema of ``tune_configs/*.yaml``, parsed into a checked ``Sweep``, and the
trial configurations it expands to (see :mod:`raydfml.tune` for the file format)."""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

# A joint grid (or choice) of compatible scenario x method pairs ("ma:free"): what ``{grid: all}`` over
# both becomes when some method does not run in some scenario, so Tune never starts such a trial.
PAIR = "scenario_method"
DIMENSIONS = ("scenario", "method", "profile", "seed", PAIR)  # space keys that are not dotted config keys
SPACE_KINDS = {"grid": None, "choice": None, "uniform": 2, "loguniform": 2, "quniform": 3, "qloguniform": 3,
               "randint": 2, "qrandint": 3, "lograndint": 2}
CATEGORICAL = ("grid", "choice")
SCHEDULERS = ("asha", "pbt", "hyperband", "median", "fifo")


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
    kw["space"] = _expand_all(dict(raw.get("space") or {}), str(raw.get("scenario", Sweep.scenario)),
                              str(raw.get("method", Sweep.method)))
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


def _expand_all(space: dict[str, Any], scenario: str, method: str) -> dict[str, Any]:
    """``{grid: all}`` / ``{choice: all}`` for scenario, method or profile: every registered one, so a
    comparison sweep picks up methods and scenarios as they are added. Pairs of a scenario and a method
    that does not run in it are skipped: a grid over both becomes one grid of compatible pairs
    (``scenario_method``), a grid over one is narrowed to what runs with the other."""
    from ..config import PROFILES, SCENARIOS, compatible
    from ..methods import method_names

    registry = {"scenario": list(SCENARIOS), "method": method_names(), "profile": list(PROFILES)}
    out, expanded = dict(space), set()
    for key, names in registry.items():
        spec = out.get(key)
        if isinstance(spec, dict) and len(spec) == 1:
            kind, args = next(iter(spec.items()))
            if kind in CATEGORICAL and args == "all":
                out[key] = {kind: list(names)}
                expanded.add(key)
    kinds = {k: next(iter(out[k])) for k in ("scenario", "method") if isinstance(out.get(k), dict) and len(out[k]) == 1}
    if not expanded & {"scenario", "method"} or not all(k in CATEGORICAL for k in kinds.values()):
        return out
    scenarios = out["scenario"][kinds["scenario"]] if "scenario" in kinds else [scenario]
    methods = out["method"][kinds["method"]] if "method" in kinds else [method]
    pairs = [(s, m) for s in scenarios for m in methods
             if not (isinstance(s, str) and isinstance(m, str) and m in registry["method"]) or compatible(s, m)]
    if len(pairs) == len(scenarios) * len(methods):
        return out
    if len(kinds) == 2 and kinds["scenario"] == kinds["method"]:
        del out["scenario"], out["method"]
        out[PAIR] = {kinds["scenario"]: [f"{s}:{m}" for s, m in pairs]}
    elif "scenario" in kinds and "method" not in kinds:
        out["scenario"] = {kinds["scenario"]: [s for s, _ in pairs]}
    elif "method" in kinds and "scenario" not in kinds:
        out["method"] = {kinds["method"]: [m for _, m in pairs]}
    else:       # a grid of one and a choice of the other: no single space holds only the pairs that run
        bad = next(f"{s}:{m}" for s in scenarios for m in methods if (s, m) not in pairs)
        raise UserError(f"space: scenario {{{kinds['scenario']}: ...}} x method {{{kinds['method']}: ...}} includes "
                        f"pairs that cannot run (e.g. {bad}); use grid for both (a joint grid of the pairs that run)")
    return out


def point_dims(sweep: "Sweep", point: dict[str, Any]) -> dict[str, Any]:
    """A trial point's scenario, method, profile and seed (the joint ``scenario_method`` split up)."""
    dims = {"scenario": sweep.scenario, "method": sweep.method, "profile": sweep.profile, "seed": sweep.seed}
    dims.update({k: v for k, v in point.items() if k in dims})
    if PAIR in point:
        dims["scenario"], dims["method"] = str(point[PAIR]).split(":", 1)
    return dims


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
    from ..config import PROFILES, SCENARIOS
    from ..methods import method_names

    if sweep.mode not in ("max", "min"):
        raise UserError(f"{where}: mode {sweep.mode!r}: choose max or min")
    if not isinstance(sweep.num_samples, int) or sweep.num_samples < 1:
        raise UserError(f"{where}: num_samples {sweep.num_samples!r}: must be a positive integer")
    if sweep.max_concurrent_trials is not None and int(sweep.max_concurrent_trials) < 1:
        raise UserError(f"{where}: max_concurrent_trials must be at least 1 (or null for no limit)")
    for key, reg in (("scenario", SCENARIOS), ("method", method_names()), ("profile", PROFILES)):
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
    """The trial's config. Options of a method or rule the trial does not use (a sweep over methods
    with ``free.warmup`` set) are left out for that trial instead of failing it."""
    from ..config import part_owner, resolve

    dims = point_dims(sweep, point)
    overrides = dict(fixed)
    overrides.update({k: v for k, v in point.items() if k not in DIMENSIONS})
    seed = dims["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"seed {seed!r}: must be an integer")
    scenario, method, profile = str(dims["scenario"]), str(dims["method"]), str(dims["profile"])
    foreign = {k for k in overrides if part_owner(k.split(".")[0]) == "method" and k.split(".")[0] != method}
    rule_keys = {k for k in overrides if part_owner(k.split(".")[0]) == "aggregation rule"}
    cfg = resolve(scenario, method, profile, {k: v for k, v in overrides.items() if k not in foreign | rule_keys},
                  seed=seed)
    if rule_keys:
        cfg = resolve(scenario, method, profile, {k: v for k, v in overrides.items() if k not in foreign and (
            k not in rule_keys or k.split(".")[0] == cfg.aggregate.rule)}, seed=seed)
    return cfg
