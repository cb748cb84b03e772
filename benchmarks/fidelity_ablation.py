"""Ablation of the fidelity fixes: each fix switched off in turn, several seeds, one table.

    python benchmarks/fidelity_ablation.py [--seeds 0,1,2] [--scenario ma] [--profile quick]
        [--data-root data] [--out runs/ablation] [--only free,tgr] [--workers 2] [--set KEY=VALUE ...]

Every row is a complete engine run per seed (``<out>/<row>/seed<k>/``, a normal run directory), on
the same data and teacher zoos; a finished run is read back, so an interrupted ablation continues
where it stopped. The table gives mean ± std across seeds of the 5-way 1-/5-shot meta-test accuracy
and of the share of the with-data gain over random init that the run recovers (with-data trained in
the same run for the same number of meta-updates), and is written to ``<out>/ablation.md`` and
``ablation.csv``. Rows:

- ``<method>``: the current defaults (every fix on);
- ``<method> - <fix>``: that fix off (the engine's behaviour before the fix);
- TGR: task-space groups against random groups of the same sizes; IGR at several displacement rates.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# row name -> (method, overrides). The first row of a method is its defaults; "- <fix>" rows switch one
# fix off (the engine's behaviour before it), the others vary a method's own option.
ROWS: dict[str, tuple[str, dict]] = {
    "free": ("free", {}),
    "free - small alignment step (align.scale 67)": ("free", {"align.scale": 67.0}),
    "free - distinct class plans per architecture": ("free", {"pool.arch_plans": "shared"}),
    "free - distil through the prototypes": ("free", {"learner.distill_via": "head"}),
    "free - 4 teachers per round (2)": ("free", {"train.teachers_per_round": 2}),
    "free - colour prior on replay (train.augment shift)": ("free", {"train.augment": "shift"}),
    "free cosine ProtoNet": ("free", {"learner.metric": "cosine"}),
    "tgr": ("tgr", {}),
    "tgr - small KD step (kd/ce weight 1)": ("tgr", {"learner.kd_weight": 1.0, "learner.ce_weight": 1.0}),
    "tgr - no BN prior (bn_weight 1)": ("tgr", {"synth.bn_weight": 1.0}),
    "tgr random groups": ("tgr", {"tgr.grouping": "random"}),
    "tgr - IGR displacement 0.1 (igr.eta 1e-3)": ("tgr", {"igr.eta": 1e-3}),
    "tgr igr.eta=1": ("tgr", {"igr.eta": 1.0}),
    "tgr - distinct class plans per architecture": ("tgr", {"pool.arch_plans": "shared"}),
    "tgr 4 teachers per round": ("tgr", {"train.teachers_per_round": 4}),
    "tgr 30 inversion steps": ("tgr", {"synth.steps": 30}),
    "tgr KD temperature 4": ("tgr", {"learner.temperature": 4.0}),
    "purer": ("purer", {}),
    "purer - 5 data steps from 6 teachers (1 from 2)": ("purer", {"purer.data_steps": 1,
                                                                  "train.teachers_per_round": 2}),
    "purer - TV prior 1e-2 (the seeds' 1e-4)": ("purer", {"purer.tv_weight": 1e-4}),
    "purer - no BN prior (the seeds' 0.01)": ("purer", {"purer.bn_weight": 0.01}),
    "purer - distinct class plans per architecture": ("purer", {"pool.arch_plans": "shared"}),
    "purer outer lr 5e-3": ("purer", {"learner.outer_lr": 5e-3}),
    "purer data lr 0.05": ("purer", {"purer.lr": 0.05}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--scenario", default="ma")
    p.add_argument("--profile", default="quick")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--only", default=None, help="comma-separated methods (default: every row)")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: tabulate the finished runs (rows with fewer seeds say so)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for every row (e.g. train.test_tasks=300 to spend less time on meta-tests)")
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
    from raydfml.errors import run_cli  # noqa: F401  (UserErrors print as one line below)
    from raydfml.experiment import run_experiment
    from raydfml.report import format_markdown
    from raydfml.seeds import aggregate

    seeds = [int(s) for s in args.seeds.split(",")]
    only = set(args.only.split(",")) if args.only else None
    rows = {name: spec for name, spec in ROWS.items() if only is None or spec[0] in only}
    out = Path(args.out).resolve()
    t0 = time.time()
    table = []

    def run_dir_of(name: str, seed: int) -> Path:
        return out / re.sub(r"[^A-Za-z0-9.=-]+", "_", name).strip("_") / f"seed{seed}"

    # Seed-major: every row gets seed 0 before any row gets seed 1, so a stopped ablation is balanced.
    for seed in ([] if args.table_only else seeds):
        for name, (method, overrides) in rows.items():
            run_dir = run_dir_of(name, seed)
            if (run_dir / "results.json").is_file():
                continue
            cfg = resolve(args.scenario, method, args.profile,
                          {"data.data_root": args.data_root, "runtime.workers": args.workers, **shared, **overrides},
                          seed=seed)
            cfg.out = str(run_dir)
            print(f"[{name}] seed {seed}: running in {run_dir} ({time.time() - t0:.0f}s)", flush=True)
            run_experiment(cfg, progress=False)
    for name, (method, overrides) in rows.items():
        per_seed = {seed: json.loads((run_dir_of(name, seed) / "results.json").read_text())
                    for seed in seeds if (run_dir_of(name, seed) / "results.json").is_file()}
        if not per_seed:
            continue
        long = aggregate(per_seed)
        mine = long[long["model"] == method]
        for _, r in mine.iterrows():
            table.append({"row": name, "shot": int(r["shot"]), "mean": r["mean"], "std": r["std"],
                          "recovered_mean": r["recovered_mean"], "recovered_std": r["recovered_std"],
                          "seeds": int(r["seeds"])})
    df = pd.DataFrame(table)
    show = {}
    for _, r in df.iterrows():
        cell = show.setdefault(r["row"], {})
        one = int(r["seeds"]) < 2                       # no spread from a single seed
        cell[f"5-way {r['shot']}-shot"] = f"{r['mean']:.1f}" + ("" if one else f" ± {r['std']:.1f}")
        rec = "–" if pd.isna(r["recovered_mean"]) else (f"{100 * r['recovered_mean']:.0f}%" if one else
                                                      f"{100 * r['recovered_mean']:.0f} ± {100 * (r['recovered_std'] or 0):.0f}%")
        cell[f"recovered {r['shot']}-shot"] = rec
        cell["seeds"] = int(r["seeds"])
    shown = pd.DataFrame.from_dict(show, orient="index")
    shown = shown[[c for c in shown.columns if c != "seeds"] + ["seeds"]]
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "ablation.csv", index=False)
    text = (f"# Fidelity ablation: {args.scenario} {args.profile}, seeds {args.seeds}\n\n{format_markdown(shown)}\n\n"
            "Mean ± sample std across seeds (the seeds column; no ± for one seed) of the final meta-test accuracy (%) "
            "and of the share of the with-data gain over random init recovered (with-data trained in the same run "
            "for the same meta-updates).\n")
    (out / "ablation.md").write_text(text)
    print(shown.to_string())
    print(f"\n{out / 'ablation.md'}  (wall {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
