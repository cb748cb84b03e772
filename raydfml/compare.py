"""Several methods on one teacher pool, one results table: ``launch.py --method a,b,c``.

Every method is resolved with the same scenario, profile, seed and overrides, so all of them see the
same data, the same teacher zoo and the same seeded meta-test tasks. Each trains into its own,
complete run directory ``<out>/<method>/`` (what ``launch.py`` writes for one method). Baselines are
shared rather than repeated per method:

- ``random_init`` and ``teacher_average`` do not depend on the method: evaluated once, first, and
  copied into every method's ``results.json``;
- ``with_data`` depends on the number of meta-updates: trained once, after the methods, with the
  largest number among them (the table's notes say so), and reported in the comparison only.

``<out>/comparison.md``, ``comparison.csv`` and ``comparison.json`` hold the combined table; the json
is written last, so its presence means the comparison completed. With ``resume`` a method whose
``results.json`` exists is read back, an unfinished one continues from its checkpoint.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from . import baselines as _baselines
from .config import ExperimentConfig, flatten
from .errors import UserError
from .report import COMPARISON_FILES, RESULTS_FILE, _jsonable, write_comparison
from . import experiment
from .runtime.driver import CHECKPOINT
from .utils import seed_everything

SHARED_BASELINES = ("random_init", "teacher_average")

# What every method of a comparison must share: the data, the pool, the learner (it is the model of
# every row and runs the meta-test protocol) and the meta-test tasks. Method presets may differ in
# anything else (synthesizer, aggregation, rounds, ...).
_SHARED_SECTIONS = ("data.", "pool.", "learner.")
_SHARED_KEYS = ("scenario", "profile", "seed", "train.way", "train.query", "train.test_tasks", "train.test_shots",
                "train.baselines")


def default_compare_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / f"compare-{cfg.scenario}-{cfg.profile}-s{cfg.seed}"


def check_comparable(cfgs: list[ExperimentConfig]) -> None:
    """Refuse (UserError) a list of configs whose rows could not share one table."""
    names = [c.method for c in cfgs]
    if not cfgs:
        raise UserError("--method: name at least one method")
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"--method {','.join(names)}: {name} is listed twice")
    ref = flatten(cfgs[0].to_dict())
    for cfg in cfgs[1:]:
        other = flatten(cfg.to_dict())
        for key in sorted(ref):
            if (key in _SHARED_KEYS or key.startswith(_SHARED_SECTIONS)) and ref[key] != other.get(key):
                raise UserError(f"--method {','.join(names)}: {names[0]} and {cfg.method} differ in {key} "
                                f"({ref[key]!r} vs {other.get(key)!r}), so their rows would not be comparable; "
                                f"align them with --set {key}=...")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({type(exc).__name__}); delete it or choose another --out") from None


def _config_mismatch(run_dir: Path, cfg: ExperimentConfig) -> str | None:
    """How ``run_dir/config.json`` differs from ``cfg`` (runtime settings and ``out`` aside), or None."""
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    saved, now = flatten(_read_json(path)), flatten(_jsonable(cfg.to_dict()))
    for key in sorted(set(saved) | set(now)):
        if key != "out" and not key.startswith("runtime.") and saved.get(key) != now.get(key):
            return f"{key}={saved.get(key)!r} there, {now.get(key)!r} now"
    return None


def _plan(cfgs: list[ExperimentConfig], out: Path, resume: bool) -> dict[str, str]:
    """Each method's state: ``done`` (results.json exists), ``resume`` (a checkpoint) or ``fresh``."""
    plan: dict[str, str] = {}
    for cfg in cfgs:
        run_dir = Path(cfg.out)
        done = (run_dir / RESULTS_FILE).is_file()
        if not resume and (done or (out / "comparison.json").is_file()):
            raise UserError(f"--out {out}: a finished comparison or method run is already there; "
                            "add --resume to reuse it, or choose another --out")
        if resume:
            mismatch = _config_mismatch(run_dir, cfg)
            if mismatch:
                raise UserError(f"--resume: {run_dir} was run with another config ({mismatch}); "
                                "use the original options or another --out")
        plan[cfg.method] = ("done" if done else
                            "resume" if resume and (run_dir / CHECKPOINT).is_file() else "fresh")
    if resume and all(state == "fresh" for state in plan.values()):
        raise UserError(f"--resume: nothing to resume in {out} (no checkpoint or results.json of "
                        f"{', '.join(plan)})")
    return plan


def _shared_from(results: dict) -> dict | None:
    """The shared baselines a finished method of this comparison recorded, or None."""
    info = results.get("comparison")
    if not isinstance(info, dict) or "shared_baselines" not in info:
        return None
    recs, names = results.get("baselines") or {}, info["shared_baselines"]
    return {"baselines": {n: recs[n] for n in names if n in recs},
            "domains": _domains_of(results.get("meta_test_domains"), names),
            "notes": list(info.get("baseline_notes") or []), "wall_s": info.get("baselines_wall_s")}


def _domains_of(per_domain: dict | None, names) -> dict[str, dict]:
    """Scenario md's per-domain records (``{domain: {model: records}}``) of the models ``names``."""
    return {ds: {n: models[n] for n in names if n in models} for ds, models in (per_domain or {}).items()}


def _merge_domains(into: dict[str, dict], per_domain: dict | None, names) -> None:
    for ds, models in _domains_of(per_domain, names).items():
        into.setdefault(ds, {}).update(models)


def _evaluate_shared(cfg: ExperimentConfig, entries, progress: bool) -> dict:
    wanted = [b for b in SHARED_BASELINES if b in cfg.train.baselines]
    if not wanted:
        return {"baselines": {}, "domains": {}, "notes": [], "wall_s": 0.0}
    seed_everything(cfg.seed)
    t0 = time.time()
    ev = _baselines.evaluate_final(cfg, None, entries, progress=progress, baselines=wanted)
    return {"baselines": ev["baselines"], "domains": _domains_of(ev.get("meta_test_domains"), ev["baselines"]),
            "notes": ev["notes"], "wall_s": round(time.time() - t0, 1)}


def _method_evaluator(shared: dict, out: Path, methods: list[str]):
    """``run_method``'s evaluate: the method's own meta-test plus the shared baselines' records."""
    pointer = f"with_data: trained once for the whole comparison; see {out / 'comparison.md'}"

    def evaluate(cfg, trained, entries, progress=True):
        res = _baselines.evaluate_final(cfg, trained, entries, progress=progress, baselines=())
        res["baselines"] = dict(shared["baselines"])
        if "meta_test_domains" in res:                  # md: the shared baselines' domain records too
            _merge_domains(res["meta_test_domains"], shared["domains"], shared["baselines"])
        res["notes"] = [*shared["notes"], *res["notes"]]
        if "with_data" in cfg.train.baselines:
            res["notes"].append(pointer)
        res["comparison"] = {"out": str(out), "methods": methods, "shared_baselines": list(shared["baselines"]),
                             "baseline_notes": shared["notes"], "baselines_wall_s": shared["wall_s"]}
        return res

    evaluate.pointer = pointer
    return evaluate


def _run_row(res: dict, state: str) -> dict:
    row = {k: res.get(k) for k in ("run_dir", "meta_test", "meta_updates", "wall_s", "best_val", "best_round")}
    row.update({k: v for k, v in res.items() if k.startswith("meta_test_") and k != "meta_test_domains"})
    row["state"] = state
    return row


def run_comparison(cfgs: list[ExperimentConfig], out_dir: str | Path | None = None, resume: bool = False,
                   progress: bool = True) -> dict:
    """Train every config's method on one shared pool and write ``<out>/comparison.*``.

    ``cfgs`` are one resolved config per method, with the same scenario/profile/seed/overrides
    (:func:`check_comparable` enforces what the table needs). Returns the comparison dict (see
    :mod:`raydfml.report`) also written to ``<out>/comparison.json``.
    """
    t_start = time.time()
    check_comparable(cfgs)
    ref = cfgs[0]
    out = Path(out_dir).resolve() if out_dir else default_compare_dir(ref).resolve()
    methods = [c.method for c in cfgs]
    cfgs = [copy.deepcopy(c) for c in cfgs]
    for cfg in cfgs:
        cfg.out = str(out / cfg.method)
    plan = _plan(cfgs, out, resume)
    for name in COMPARISON_FILES:           # stale until this comparison completes
        (out / name).unlink(missing_ok=True)

    seed_everything(ref.seed)
    entries = experiment.prepare_experiment(ref, resume=resume, progress=progress)   # data, Ray, pool: once
    finished = {c.method: _read_json(Path(c.out) / RESULTS_FILE) for c in cfgs if plan[c.method] == "done"}
    shared = next((s for s in map(_shared_from, finished.values()) if s is not None), None)
    if shared is None:
        shared = _evaluate_shared(ref, entries, progress)
    evaluate = _method_evaluator(shared, out, methods)

    results: dict[str, dict] = {}
    for i, cfg in enumerate(cfgs, 1):
        run_dir, state = Path(cfg.out), plan[cfg.method]
        if state == "done":
            print(f"[{i}/{len(cfgs)}] {cfg.method}: finished earlier, results read back from {run_dir}", flush=True)
            results[cfg.method] = finished[cfg.method]
            continue
        print(f"[{i}/{len(cfgs)}] {cfg.method}: {'resuming' if state == 'resume' else 'training'} in {run_dir}",
              flush=True)
        seed_everything(cfg.seed)      # as run_experiment: each row is what a run of that method alone gives
        results[cfg.method] = experiment.run_method(cfg, run_dir, entries, resume=state == "resume",
                                                progress=progress, evaluate=evaluate)

    baseline_recs = dict(shared["baselines"])
    domains: dict[str, dict] = {}                       # md: {domain: {row: records}}, rows in table order
    for m in methods:
        _merge_domains(domains, results[m].get("meta_test_domains"), [m])
    _merge_domains(domains, shared["domains"], shared["baselines"])
    info: dict[str, dict] = {name: {"meta_updates": 0} for name in baseline_recs if name == "random_init"}
    notes = list(shared["notes"])
    if baseline_recs:
        notes.append(f"{' and '.join(baseline_recs)}: evaluated once and shared by every method "
                     "(independent of the method).")
    if "with_data" in ref.train.baselines:
        updates = max(int(results[m]["meta_updates"]) for m in methods)
        largest = [m for m in methods if int(results[m]["meta_updates"]) == updates]
        seed_everything(ref.seed)
        ev = _baselines.evaluate_final(ref, None, entries, progress=progress, baselines=("with_data",),
                                       with_data_updates=updates)
        baseline_recs["with_data"] = ev["baselines"]["with_data"]
        _merge_domains(domains, ev.get("meta_test_domains"), ["with_data"])
        info["with_data"] = {"meta_updates": updates, "wall_s": ev["time/with_data_s"]}
        notes.append(f"with_data: the learner meta-trained on real meta-train episodes, once, for the largest "
                     f"number of meta-updates among the methods ({updates}, {', '.join(largest)}); its wall time "
                     "is its training.")
    for m in methods:
        notes += [f"{m}: {n}" for n in results[m].get("notes") or []
                  if n not in shared["notes"] and n != evaluate.pointer]

    comparison = {"scenario": ref.scenario, "profile": ref.profile, "seed": ref.seed, "methods": methods,
                  "runs": {m: _run_row(results[m], plan[m]) for m in methods},
                  "baselines": baseline_recs, "baseline_info": info, "notes": notes,
                  "wall_s": round(time.time() - t_start, 1), "out": str(out)}
    if domains:
        comparison["meta_test_domains"] = domains
    write_comparison(out, comparison)
    return comparison
