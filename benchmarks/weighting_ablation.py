"""Task-weighting ablation (MTM): rules x {data-free, real data} x {1-shot, 5-shot}, several seeds.

    python benchmarks/weighting_ablation.py [--rules none,spsa,spsa_track,per_class,uncertainty]
        [--sources teachers,real] [--shots 1,5] [--seeds 0,1,2] [--scenario mr] [--method deepinv]
        [--profile quick] [--data-root data] [--out runs/weighting_ablation] [--parallel 2] [--set KEY=VALUE ...]

Every cell is a complete engine run (``<out>/<source>/<rule>/<shot>shot/seed<k>/``, a normal run
directory): meta-trained at that shot and meta-tested at it, on the same data, teacher zoo and
meta-update budget (a real-data round makes as many meta-updates as a data-free one). Runs go to Ray
as one-CPU tasks, ``--parallel`` at a time, each in-process; a finished run is read back and an
unfinished one resumed, so an interrupted ablation continues where it stopped.

The table (``<out>/weighting_ablation.md`` and ``.csv``) gives, per source and shot, the mean ± std
across seeds of the meta-test accuracy, the mean per-run 95% CI, and each rule's difference from
``none`` paired by seed (same seed: same teachers, episodes and initialisation) with a 95% t-interval;
"n.s." where that interval contains 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def cell_config(args, source: str, rule: str, shot: int, seed: int, extra: dict):
    from raydfml.config import resolve

    # Random init depends on neither the rule nor the source: evaluated in the `none` runs only. Every
    # data-free run reads the seed's per-teacher recoveries from one cache (recovery never depends on
    # the meta-model), so only the first run of a seed pays for synthesis.
    over = {"data.data_root": str(Path(args.data_root).resolve()), "runtime.workers": 0,
            "train.source": source, "aggregate.weighting": rule, "learner.train_shot": shot,
            "train.test_shots": (shot,), "train.baselines": ("random_init",) if rule == "none" else (),
            "runtime.synth_cache": str(Path(args.out).resolve() / "synth_cache"), **extra}
    cfg = resolve(args.scenario, args.method, args.profile, over, seed=seed)
    cfg.out = str(Path(args.out).resolve() / source / rule / f"{shot}shot" / f"seed{seed}")
    return cfg


def run_cell(cfg_dict: dict) -> dict:
    """One run (a Ray task body): finished -> read back; unfinished -> resumed; else started."""
    import torch

    from raydfml.config import ExperimentConfig
    from raydfml.experiment import run_dir_for, run_method
    from raydfml.runtime.pool import existing_pool
    from raydfml.utils import seed_everything

    torch.set_num_threads(1)
    cfg = ExperimentConfig.from_dict(cfg_dict)
    out = Path(cfg.out)
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    resume = (out / "checkpoints" / "last.pt").is_file()
    seed_everything(cfg.seed)
    # The zoo was built before the runs started: read it (concurrent runs never build it twice).
    entries = existing_pool(cfg) if cfg.train.source == "teachers" else []
    return run_method(cfg, run_dir_for(cfg, resume), entries, resume=resume, progress=False)


def _accuracy(res: dict) -> tuple[float, float]:
    rec = res["meta_test"][0]
    return float(rec["accuracy"]), float(rec["ci95"])


def table(cells: dict, rules: list[str], sources: list[str], shots: list[int], seeds: list[int]):
    """Long rows (one per rule x source x shot) and the markdown table."""
    import numpy as np

    rows, md = [], []
    for shot in shots:
        md += [f"\n**5-way {shot}-shot** (trained and tested at {shot} shot; mean ± std over seeds {seeds}; "
               "per-run CI95 in brackets; Δ = rule − none, paired by seed, 95% t-interval; spread = max/min of the "
               "final relative weights 1/w², seed " + str(seeds[0]) + ")\n",
               "| rule | " + " | ".join(f"{'data-free' if s == 'teachers' else 'real data'}" for s in sources) + " |",
               "|---|" + "---|" * len(sources)]
        rand = {s: [cells[(s, "none", shot, k)]["baselines"]["random_init"][0]["accuracy"] for k in seeds]
                for s in sources if "none" in rules}
        if rand:
            md.append("| random init | " + " | ".join(f"{np.mean(rand[s]):.1f} ± {np.std(rand[s], ddof=1):.1f}"
                                                       if len(seeds) > 1 else f"{rand[s][0]:.1f}" for s in sources) + " |")
        for rule in rules:
            line = [rule]
            for source in sources:
                acc = np.array([_accuracy(cells[(source, rule, shot, k)])[0] for k in seeds])
                ci = np.mean([_accuracy(cells[(source, rule, shot, k)])[1] for k in seeds])
                base = np.array([_accuracy(cells[(source, "none", shot, k)])[0] for k in seeds]) \
                    if "none" in rules else None
                row = {"rule": rule, "source": source, "shot": shot, "seeds": len(seeds),
                       "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                       "run_ci95": float(ci),
                       "meta_updates": int(cells[(source, rule, shot, seeds[0])]["meta_updates"]),
                       "weight_spread": _spread(cells[(source, rule, shot, seeds[0])])}
                text = f"{row['mean']:.1f} ± {row['std']:.1f} [±{ci:.1f}]"
                if base is not None and rule != "none" and len(seeds) > 1:
                    d = acc - base
                    half = T975.get(len(d) - 1, 1.96) * d.std(ddof=1) / np.sqrt(len(d))
                    row.update(delta=float(d.mean()), delta_ci95=float(half),
                               significant=bool(abs(d.mean()) > half))
                    text += f"; Δ {d.mean():+.1f} ± {half:.1f}" + ("" if row["significant"] else " n.s.")
                if row["weight_spread"] is not None:
                    text += f"; spread {row['weight_spread']:.3g}"
                rows.append(row)
                line.append(text)
            md.append("| " + " | ".join(line) + " |")
    return rows, "\n".join(md)


def _spread(res: dict) -> float | None:
    """max/min of the final relative weights over every weighted key (1: uniform)."""
    values = [v for per in (res.get("weights") or {}).values() for v in per.values()]
    if not values:
        return None
    return round(max(values) / min(values), 4) if min(values) > 0 else float("inf")   # a weight driven to 0


def main() -> None:
    from raydfml.cli import set_overrides
    from raydfml.errors import UserError, user_error_of

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", default="none,spsa,spsa_track,per_class,uncertainty")
    p.add_argument("--sources", default="teachers,real")
    p.add_argument("--shots", default="1,5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--scenario", default="mr")
    p.add_argument("--method", default="deepinv")
    p.add_argument("--profile", default="quick")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default="runs/weighting_ablation")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one CPU each)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for every run (default here: train.test_tasks=300, train.val_tasks=40)")
    args = p.parse_args()
    try:
        extra = {"train.test_tasks": 300, "train.val_tasks": 40, **set_overrides(args.set)}
        rules, sources = args.rules.split(","), args.sources.split(",")
        shots, seeds = [int(s) for s in args.shots.split(",")], [int(s) for s in args.seeds.split(",")]
        plan = [(s, r, k, seed) for seed in seeds for k in shots for s in sources for r in rules]
        # Per seed: one data-free run first (it fills the recovery cache), the real-data runs beside it,
        # then the data-free runs that read the cache.
        plan.sort(key=lambda c: (c[3], 0 if c[0] == "teachers" and (c[1], c[2]) == (rules[0], shots[0])
                                 else 1 if c[0] != "teachers" else 2))
        cfgs = {key: cell_config(args, *key, extra) for key in plan}       # every option checked up front
    except UserError as exc:
        sys.exit(f"error: {exc}")
    import ray
    from tqdm.auto import tqdm

    from raydfml.cluster import ensure_ray
    from raydfml.data.layout import ensure_dataset
    from raydfml.runtime.pool import prepare_pool

    t0 = time.time()
    first = next(iter(cfgs.values()))
    ensure_dataset(Path(first.data.data_root), first.data.dataset)
    if "teachers" in sources:                  # the zoo once, before the runs share it
        ensure_ray(num_cpus=args.parallel)
        prepare_pool(cfgs[next(k for k in plan if k[0] == "teachers")], args.parallel, progress=True)
    ensure_ray(num_cpus=args.parallel)
    task = ray.remote(run_cell).options(num_cpus=1, num_gpus=0, max_retries=1)
    refs = {task.remote(cfg.for_workers()): key for key, cfg in cfgs.items()}
    cells, pending = {}, list(refs)
    with tqdm(total=len(refs), desc="weighting ablation", unit="run") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                cells[refs[done[0]]] = ray.get(done[0])
            except Exception as exc:                 # a user error inside a run: one line, like launch.py
                err = user_error_of(exc)
                if err is None:
                    raise
                sys.exit(f"error: {err}")
            bar.update(1)
    rows, md = table(cells, rules, sources, shots, seeds)
    out = Path(args.out).resolve()
    header = (f"# Task-weighting ablation: {args.scenario} {args.method} {args.profile}, "
              f"{len(plan)} runs in {time.time() - t0:.0f} s\n\n"
              f"`python benchmarks/weighting_ablation.py {' '.join(sys.argv[1:])}`\n")
    (out / "weighting_ablation.md").write_text(header + md + "\n")
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "weighting_ablation.csv", index=False)
    print(header + md)


if __name__ == "__main__":
    main()
