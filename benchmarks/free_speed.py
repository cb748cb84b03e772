"""FREE's speed claim as a user feels it: synthesis compute per recovered task against the downstream
meta-test accuracy it buys, for FREE's meta-generator and for per-task generator inversion, side by
side in one run.

    python benchmarks/free_speed.py [--scenario ma] [--profile quick] [--free-steps 5,15]
        [--inversion-steps 15,50,200] [--seed 0] [--data-root data] [--out runs/free_speed] [--set KEY=VALUE]

Rows are complete engine runs on the same pool, data, rounds and teachers per round:

- ``free k``: FREE's meta-generator adapted to each teacher in ``k`` steps (``free.adapt_steps``), with
  its warm-up rounds (their recoveries count as synthesis cost; they train only the generator);
- ``inversion k``: a fresh generator inverted for ``k`` steps per teacher visit (method ``geninv``,
  TGR's recovery without grouping), the per-task baseline FREE's 20x claim is made against.

Per row: teacher forward+backward passes and synthesis wall time per recovered task, the teachers'
accuracy on their recovered images, the meta-test accuracy (5-way 1-/5-shot) and the share of the
with-data gain recovered. The summary then states, for each FREE row, how many more passes per task
per-task inversion needed for the same accuracy (linear interpolation between inversion budgets, in
log-steps), or that no inversion budget tried reached it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _row(results: dict, run_dir: Path) -> dict:
    import pandas as pd

    m = pd.read_csv(run_dir / "metrics.csv")
    tasks = float(sum(v for k, v in m.sum(numeric_only=True).items() if k.startswith("teachers/")))
    acc = {r["shot"]: r["accuracy"] for r in results["meta_test"]}
    rec = (results.get("recovered") or {}).get("with_data") or {}
    return {"passes_per_task": float(m["synth/passes"].sum()) / tasks,
            "synth_s_per_task": float(m["time/synthesis_s"].sum()) / tasks,
            "teacher_acc": float(m["synth/teacher_acc"].mean()), "tasks": int(tasks),
            "acc_1shot": acc.get(1), "acc_5shot": acc.get(5),
            "recovered_1shot": rec.get("1"), "recovered_5shot": rec.get("5")}


def passes_for(accuracy: float, inversion: list[dict], shot: int) -> float | None:
    """Passes per task per-task inversion needs for ``accuracy`` (interpolated in log-passes)."""
    pts = sorted((r["passes_per_task"], r[f"acc_{shot}shot"]) for r in inversion)
    if pts and accuracy <= pts[0][1]:
        return pts[0][0]
    for (p0, a0), (p1, a1) in zip(pts, pts[1:]):
        if a0 < accuracy <= a1 or (a1 < a0 and accuracy <= a0):
            if a1 == a0:
                return p1
            f = (accuracy - a0) / (a1 - a0)
            return math.exp(math.log(p0) + f * (math.log(p1) - math.log(p0)))
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="ma")
    p.add_argument("--profile", default="quick")
    p.add_argument("--free-steps", default="5,15")
    p.add_argument("--inversion-steps", default="15,50,200")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default="runs/free_speed")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for every row (e.g. train.test_tasks=300)")
    args = p.parse_args()
    from raydfml.cli import set_overrides
    from raydfml.errors import UserError

    try:
        shared = set_overrides(args.set)
    except UserError as e:
        sys.exit(f"error: {e}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import pandas as pd

    from raydfml.config import resolve
    from raydfml.experiment import run_experiment
    from raydfml.report import format_markdown

    out = Path(args.out).resolve()
    rows = [(f"free {k}", "free", {"free.adapt_steps": int(k)}) for k in args.free_steps.split(",")]
    rows += [(f"inversion {k}", "geninv", {"synth.steps": int(k)}) for k in args.inversion_steps.split(",")]
    t0 = time.time()
    table = {}
    for name, method, over in rows:
        run_dir = out / name.replace(" ", "_")
        if (run_dir / "results.json").is_file():
            results = json.loads((run_dir / "results.json").read_text())
        else:
            cfg = resolve(args.scenario, method, args.profile, {"data.data_root": args.data_root,
                                                                 "runtime.workers": args.workers, **shared, **over}, seed=args.seed)
            cfg.out = str(run_dir)
            print(f"[{name}] running in {run_dir}", flush=True)
            results = run_experiment(cfg, progress=False)
        table[name] = _row(results, run_dir)
    df = pd.DataFrame.from_dict(table, orient="index")
    inversion = [r for n, r in table.items() if n.startswith("inversion")]
    lines = []
    for name, r in table.items():
        if not name.startswith("free"):
            continue
        for shot in (1, 5):
            need = passes_for(r[f"acc_{shot}shot"], inversion, shot)
            lines.append(f"{name}, {shot}-shot {r[f'acc_{shot}shot']:.1f}: " +
                         (f"per-task inversion needs {need:.0f} passes per task for it, "
                          f"{need / r['passes_per_task']:.1f}x FREE's {r['passes_per_task']:.1f} (warm-up included)"
                          if need is not None else "no per-task inversion budget tried reached it"))
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "free_speed.csv")
    shown = df.round(3)
    text = (f"# FREE's speed, {args.scenario} {args.profile}, seed {args.seed}\n\n{format_markdown(shown)}\n\n"
            + "\n".join(f"- {ln}" for ln in lines) + "\n")
    (out / "free_speed.md").write_text(text)
    print(shown.to_string())
    print("\n" + "\n".join(lines))
    print(f"\n{out / 'free_speed.md'}  (wall {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
