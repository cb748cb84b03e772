"""A finished (or interrupted) sweep's results: one row per trial, the best by the sweep's metric,
and the ``launch.py`` command that reruns it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .sweep import PAIR, Sweep, point_dims

TABLE_CSV, TABLE_MD, BEST_JSON = "trials.csv", "trials.md", "best.json"


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

    dims = ["scenario", "method", "profile", *[k for k in sweep.space if k not in ("scenario", "method", "profile",
                                                                                  PAIR)]]
    rows = []
    for t in trials:
        m, c = dict(t.last_result or {}), dict(t.config or {})
        c.update({k: v for k, v in point_dims(sweep, c).items() if k in dims})
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
    dims = point_dims(sweep, best_cfg)
    parts = ["python launch.py", f"--scenario {dims['scenario']}", f"--method {dims['method']}",
             f"--profile {dims['profile']}"]
    if "seed" in best_cfg:
        parts.append(f"--seed {best_cfg['seed']}")
    for k, v in sets.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        parts.append(f"--set {k}={v}")
    return " ".join(parts)


def write_results(sweep: Sweep, exp_path: Path, quiet: bool = False) -> dict[str, Any]:
    """trials.csv, trials.md and best.json in the experiment directory; prints the table and the best."""
    from ..report import format_markdown
    from ..utils import atomic_path

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
