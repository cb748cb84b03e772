"""Several methods on one teacher pool, one results table: ``launch.py --method a,b,c``.

Every method is resolved with the same scenario, profile, seed and overrides, so all of them see the
same data, the same teacher zoo and the same seeded meta-test tasks. Each trains into its own,
complete run directory ``<out>/<method>/`` (what ``launch.py`` writes for one method). Baselines are
shared rather than repeated per method:

- ``random_init`` and ``teacher_average`` do not depend on the method: evaluated once, first, and
  copied into every method's ``results.json``;
- ``with_data`` and ``with_data_pool`` depend on the number of meta-updates: each method's run trains
  them for *its own* number (so its share of the with-data gain, ``recovered``, compares like with
  like), and the table's baseline rows show those of the method with the most meta-updates.

``<out>/comparison.md``, ``comparison.csv`` and ``comparison.json`` hold the combined table; the json
is written last, so its presence means the comparison completed. With ``resume`` a method whose
``results.json`` exists is read back, an unfinished one continues from its checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from . import baselines as _baselines
from .config import ExperimentConfig, flatten
from .errors import UserError
from . import experiment
from .diagnostics import gain_recovered
from .report import RESULTS_FILE, _jsonable, _records, _write_text, format_markdown, models_table
from .runtime.driver import CHECKPOINT
from .utils import atomic_path, seed_everything

SHARED_BASELINES = ("random_init", "teacher_average")

# What every method of a comparison must share: the data, the pool, the learner (it is the model of
# every row and runs the meta-test protocol) and the meta-test tasks. Method presets may differ in
# anything else (synthesizer, aggregation, rounds, ...).
_SHARED_SECTIONS = ("data.", "pool.", "learner.")
# ... except a method's own training choices: the weights of the distillation loss on teacher-labelled
# tasks (never used on real episodes or in the meta-test), the outer lr of its meta-updates and the ways
# of its meta-training episodes (a method's with-data reference is trained in its own run, at its lr, on
# its episodes, for its own number of meta-updates; the table's notes name them when they differ). None
# changes the meta-test protocol.
_METHOD_LEARNER_KEYS = ("learner.kd_weight", "learner.ce_weight", "learner.temperature", "learner.distill_via",
                        "learner.outer_lr", "learner.train_way")
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
            shared = key in _SHARED_KEYS or (key.startswith(_SHARED_SECTIONS) and key not in _METHOD_LEARNER_KEYS)
            if shared and ref[key] != other.get(key):
                raise UserError(f"--method {','.join(names)}: {names[0]} and {cfg.method} differ in {key} "
                                f"({ref[key]!r} vs {other.get(key)!r}), so their rows would not be comparable; "
                                f"align them with --set {key}=...")


def outer_lr_note(cfgs: list[ExperimentConfig]) -> str | None:
    """The table's note when the methods' presets chose different outer lrs (None when they agree)."""
    lrs = {c.method: c.learner.outer_lr for c in cfgs}
    if len(set(lrs.values())) < 2:
        return None
    return ("learner.outer_lr differs by method (" + ", ".join(f"{m} {lr:g}" for m, lr in lrs.items())
            + "): each method's meta-updates and its with-data reference use its own.")


def episode_way_note(cfgs: list[ExperimentConfig]) -> str | None:
    """The table's note when the methods meta-train on episodes of different ways (None when they agree)."""
    ways = {c.method: c.episode_way for c in cfgs}
    if len(set(ways.values())) < 2:
        return None
    return ("meta-training episodes differ in ways by method (" + ", ".join(f"{m} {w}" for m, w in ways.items())
            + f"-way; every meta-test task is {cfgs[0].train.way}-way): each method's replay and its with-data "
            "reference use its own.")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({type(exc).__name__}); delete it or choose another --out") from None


def _config_mismatch(run_dir: Path, cfg: ExperimentConfig) -> str | None:
    """How ``run_dir/config.json`` differs from ``cfg`` in an option that decides results (the same rule
    as a single run's --resume: runtime settings, ``out`` and options added since at their defaults
    aside), or None."""
    from .rundir import option_differences

    path = run_dir / "config.json"
    if not path.is_file():
        return None
    diff = option_differences(_read_json(path), cfg)
    return diff[0] if diff else None


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
    """``run_method``'s evaluate: the method's own meta-test, the with-data references trained for its
    own number of meta-updates, and the shared baselines' records."""
    def evaluate(cfg, trained, entries, progress=True):
        res = _baselines.evaluate_final(cfg, trained, entries, progress=progress,
                                        baselines=_baselines.TRAINED_BASELINES)
        own = res["baselines"]
        res["baselines"] = {**shared["baselines"], **own}
        if "meta_test_domains" in res:                  # md: the shared baselines' domain records too
            _merge_domains(res["meta_test_domains"], shared["domains"], shared["baselines"])
        res["notes"] = [*shared["notes"], *res["notes"]]
        res["comparison"] = {"out": str(out), "methods": methods, "shared_baselines": list(shared["baselines"]),
                             "baseline_notes": shared["notes"], "baselines_wall_s": shared["wall_s"]}
        return res

    return evaluate


def _run_row(res: dict, state: str) -> dict:
    row = {k: res.get(k) for k in ("run_dir", "meta_test", "meta_updates", "wall_s", "best_val", "best_round",
                                   "recovered")}
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
    trained = [b for b in _baselines.TRAINED_BASELINES if b in ref.train.baselines]
    if trained:
        updates = max(int(results[m]["meta_updates"]) for m in methods)
        largest = next(m for m in methods if int(results[m]["meta_updates"]) == updates)
        for name in trained:
            recs = (results[largest].get("baselines") or {}).get(name)
            if recs is None:
                continue
            baseline_recs[name] = recs
            _merge_domains(domains, results[largest].get("meta_test_domains"), [name])
            info[name] = {"meta_updates": updates}
        notes.append(f"{' and '.join(trained)}: the learner meta-trained on real meta-train episodes (with_data_pool: "
                     "only the classes the pool's teachers cover), trained in each method's run for its own number of "
                     "meta-updates, against which its 'recovered' share is computed; the rows show "
                     f"{largest}'s ({updates} meta-updates).")
    notes += [n for n in (outer_lr_note(cfgs), episode_way_note(cfgs)) if n]
    for m in methods:
        if not results[m].get("recovered") and results[m].get("meta_test"):
            results[m]["recovered"] = gain_recovered(results[m]["meta_test"], results[m].get("baselines") or {})
    for m in methods:
        notes += [f"{m}: {n}" for n in results[m].get("notes") or []
                  if n not in shared["notes"]]

    comparison = {"scenario": ref.scenario, "profile": ref.profile, "seed": ref.seed, "methods": methods,
                  "runs": {m: _run_row(results[m], plan[m]) for m in methods},
                  "baselines": baseline_recs, "baseline_info": info, "notes": notes,
                  "wall_s": round(time.time() - t_start, 1), "out": str(out)}
    if domains:
        comparison["meta_test_domains"] = domains
    write_comparison(out, comparison)
    return comparison


# ----------------------------------------------------------------------------- the comparison table
# A comparison (raydfml.compare) is one dict: {"scenario", "profile", "seed", "methods": [names],
# "runs": {method: {"meta_test", "meta_updates", "wall_s", "run_dir", ...}}, "baselines": {name:
# records}, "baseline_info": {name: {"meta_updates", "wall_s"}}, "notes": [...], "wall_s"}; scenario md
# adds "meta_test_domains": {domain: {row: records}} (the headline records are the mean over domains).
COMPARISON_FILES = ("comparison.md", "comparison.csv", "comparison.png", "comparison.json")


def _comparison_rows(comparison: Mapping) -> list[tuple[str, str, Any, dict]]:
    """``(name, kind, records, info)`` per row: each method in order, then each baseline."""
    runs = comparison.get("runs") or {}
    rows = [(m, "method", (runs.get(m) or {}).get("meta_test"), runs.get(m) or {}) for m in comparison["methods"]]
    info = comparison.get("baseline_info") or {}
    for name, recs in (comparison.get("baselines") or {}).items():
        rows.append((str(name), "baseline", recs, info.get(name) or {}))
    return rows


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    return format(int(value) if spec == "d" else float(value), spec)


def comparison_table(comparison: Mapping) -> pd.DataFrame:
    """One table for several methods on one pool: rows = each method then each baseline, columns the
    settings of :func:`results_table` plus ``meta-updates`` and ``wall (s)`` ("–" where a row has none:
    random_init and teacher_average are not trained)."""
    rows = _comparison_rows(comparison)
    df = models_table([(name, recs) for name, _, recs, _ in rows])
    df["meta-updates"] = [_fmt(info.get("meta_updates"), "d") for _, _, _, info in rows]
    df["wall (s)"] = [_fmt(info.get("wall_s"), ".0f") for _, _, _, info in rows]
    df["recovered"] = [_recovered_cell(info.get("recovered")) for _, _, _, info in rows]
    return df


def _recovered_cell(recovered: Mapping | None) -> str:
    """``"31% / 30%"``: the share of with_data's gain over random_init, per shot (same meta-updates)."""
    shares = (recovered or {}).get("with_data") or {}
    return " / ".join(f"{100 * float(shares[k]):.0f}%" for k in sorted(shares, key=int)) or "–"


def _comparison_domain_rows(comparison: Mapping) -> dict[str, list[tuple[str, str, Any, dict]]]:
    """Scenario md: :func:`_comparison_rows` of each domain's own meta-test; ``{}`` without domains."""
    rows = _comparison_rows(comparison)
    return {str(ds): [(name, kind, (per_model or {}).get(name), info) for name, kind, _, info in rows]
            for ds, per_model in (comparison.get("meta_test_domains") or {}).items()}


def comparison_long(comparison: Mapping) -> pd.DataFrame:
    """Numeric long table of a comparison: one row per (model, way, shot), with the row's kind
    (method | baseline), tasks, accuracy, ci95, meta_updates and wall_s; ``domain`` is empty for the
    headline records and names the domain for scenario md's per-domain records."""
    out = []
    for domain, rows in {"": _comparison_rows(comparison), **_comparison_domain_rows(comparison)}.items():
        for name, kind, recs, info in rows:
            for r in _records(recs) or []:
                out.append({"model": name, "kind": kind, "domain": domain, "way": int(r["way"]),
                            "shot": int(r["shot"]), "tasks": int(r.get("tasks", 0)), "accuracy": float(r["accuracy"]),
                            "ci95": float(r["ci95"]), "meta_updates": info.get("meta_updates"),
                            "wall_s": info.get("wall_s")})
    return pd.DataFrame(out, columns=["model", "kind", "domain", "way", "shot", "tasks", "accuracy", "ci95",
                                      "meta_updates", "wall_s"])


def _comparison_markdown(comparison: Mapping) -> str:
    title = " · ".join(str(comparison[k]) for k in ("scenario", "profile") if k in comparison)
    recs = [r for _, _, recs, _ in _comparison_rows(comparison) for r in _records(recs) or []]
    tasks = sorted({int(r.get("tasks", 0)) for r in recs})
    lines = [f"# Comparison: {title} (seed {comparison.get('seed', '?')})", "",
             format_markdown(comparison_table(comparison)), "",
             "Mean query accuracy (%) ± 95% CI (1.96·std/√n, sample std) over "
             + (", ".join(map(str, tasks)) or "?") + " fixed, seeded meta-test tasks; every row is scored on the "
             "same tasks, with the same teacher pool and data. Wall time of a method: its training and meta-test. "
             "recovered: the method's gain over random_init as a share of with_data's, per setting, with-data "
             "trained for the method's own number of meta-updates (comparison.json also has it against "
             "with_data_pool, the classes the pool covers).", ""]
    lines += [f"- {note}" for note in comparison.get("notes") or []]
    if "wall_s" in comparison:
        lines.append(f"- Total wall time: {float(comparison['wall_s']):.1f} s.")
    per_domain = _comparison_domain_rows(comparison)
    if per_domain:
        lines.append(f"- Scenario md: the table is the mean over the {len(per_domain)} domains below.")
    for domain, rows in per_domain.items():
        lines += ["", f"## {domain} (its meta_test split)", "",
                  format_markdown(models_table([(name, recs) for name, _, recs, _ in rows]))]
    return "\n".join(lines) + "\n"


def write_comparison(out_dir: str | os.PathLike, comparison: Mapping) -> None:
    """``comparison.md``, ``comparison.csv``, then ``comparison.json`` (last, atomically: its presence
    means the comparison completed) in ``out_dir``."""
    out_dir = Path(out_dir)
    comparison = _jsonable(dict(comparison))
    _write_text(out_dir / "comparison.md", _comparison_markdown(comparison))
    long = comparison_long(comparison)
    with atomic_path(out_dir / "comparison.csv") as tmp:
        long.to_csv(tmp, index=False)
    plot_comparison(long, out_dir / "comparison.png")
    _write_text(out_dir / "comparison.json", json.dumps(comparison, indent=2, allow_nan=False) + "\n")


def plot_comparison(long: pd.DataFrame, path: Path) -> None:
    """``comparison.png``: accuracy per model (methods, then baselines) and shot, with 95% CI bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = long[(long["domain"].fillna("") == "")] if "domain" in long.columns else long
    if rows.empty:
        return
    models = list(dict.fromkeys(rows["model"]))
    shots = sorted(rows["shot"].unique())
    fig = Figure(figsize=(1.2 + 1.1 * len(models), 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(shots)
    for k, shot in enumerate(shots):
        sub = rows[rows["shot"] == shot].set_index("model")
        xs = [i + (k - (len(shots) - 1) / 2) * width for i in range(len(models))]
        acc = [float(sub.loc[m, "accuracy"]) if m in sub.index else float("nan") for m in models]
        ci = [float(sub.loc[m, "ci95"]) if m in sub.index else 0.0 for m in models]
        ax.bar(xs, acc, width, yerr=ci, capsize=3, label=f"{int(rows['way'].iloc[0])}-way {int(shot)}-shot")
    ax.set_xticks(range(len(models)), models, rotation=20, ha="right")
    ax.set_ylabel("meta-test accuracy (%) ± 95% CI")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


