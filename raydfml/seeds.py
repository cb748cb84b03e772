"""Several seeds in one command: ``launch.py --seeds 0,1,2`` (one method or a comparison).

Each seed is a complete run (or comparison) in ``<out>/seed<k>/``, exactly what ``--seed k`` writes;
then ``<out>/seeds.md``, ``seeds.csv`` and ``seeds.json`` (written last) hold the per-seed table and
mean ± std across seeds per model and setting, with the share of the with-data gain recovered. The
per-seed CIs say how precise one seed's meta-test is; the std across seeds says how much a result
moves with the seed (teacher draws, synthesis, initialisation), which is what a comparison needs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .errors import UserError
from .report import RESULTS_FILE, _jsonable, _write_text, format_markdown
from .utils import atomic_path

SEEDS_FILES = ("seeds.md", "seeds.csv", "seeds.json")


def parse_seeds(value: str) -> list[int]:
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {value!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {value!r}: give at least one seed, each once")
    return seeds


def default_seeds_dir(scenario: str, methods: list[str], profile: str, seeds: list[int]) -> Path:
    what = methods[0] if len(methods) == 1 else "compare"
    return Path("runs") / f"{scenario}-{what}-{profile}-seeds{'-'.join(map(str, seeds))}"


def _rows_of(one: dict) -> dict[str, dict]:
    """``{model: {"records": [...], "recovered": {...} | None, "kind": ...}}`` of one seed's run or comparison."""
    if "runs" in one:                                           # a comparison
        rows = {m: {"records": r["meta_test"], "recovered": r.get("recovered"), "kind": "method"}
                for m, r in one["runs"].items()}
    else:
        rows = {one["method"]: {"records": one["meta_test"], "recovered": one.get("recovered"), "kind": "method"}}
    for name, recs in (one.get("baselines") or {}).items():
        rows[name] = {"records": recs, "recovered": None, "kind": "baseline"}
    return rows


def aggregate(per_seed: dict[int, dict]) -> pd.DataFrame:
    """Long table: one row per (model, shot) with the per-seed accuracies, their mean and sample std,
    and the mean share of the with-data gain recovered (methods)."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for seed, one in per_seed.items():
        for model, row in _rows_of(one).items():
            shares = ((row["recovered"] or {}).get("with_data") or {})
            for r in row["records"] or []:
                cell = out.setdefault((model, int(r["shot"])), {"model": model, "kind": row["kind"],
                                                                "way": int(r["way"]), "shot": int(r["shot"]),
                                                                "acc": {}, "recovered": {}})
                cell["acc"][seed] = float(r["accuracy"])
                share = shares.get(str(r["shot"]), shares.get(int(r["shot"])))
                if share is not None:
                    cell["recovered"][seed] = float(share)
    rows = []
    for cell in out.values():
        acc = np.array(list(cell["acc"].values()))
        rec = np.array(list(cell["recovered"].values()))
        rows.append({"model": cell["model"], "kind": cell["kind"], "way": cell["way"], "shot": cell["shot"],
                     "seeds": len(acc), "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                     "recovered_mean": float(rec.mean()) if len(rec) else None,
                     "recovered_std": float(rec.std(ddof=1)) if len(rec) > 1 else None,
                     **{f"seed{s}": a for s, a in cell["acc"].items()}})
    return pd.DataFrame(rows)


def seeds_table(long: pd.DataFrame) -> pd.DataFrame:
    """Display table: rows = models (methods first), columns ``5-way K-shot`` as ``mean ± std`` and the
    methods' mean share of the with-data gain recovered per shot."""
    table: dict[str, dict[str, str]] = {}
    for _, r in long.iterrows():
        row = table.setdefault(r["model"], {})
        row[f"{r['way']}-way {r['shot']}-shot"] = f"{r['mean']:.1f} ± {r['std']:.1f}"
        if r["recovered_mean"] is not None and not pd.isna(r["recovered_mean"]):
            row.setdefault("recovered", [])
            row["recovered"].append(f"{100 * r['recovered_mean']:.0f}%")
    for row in table.values():
        row["recovered"] = " / ".join(row.get("recovered") or []) or "–"
    df = pd.DataFrame.from_dict(table, orient="index")
    df.index.name = "model"
    return df


def run_seeds(seeds: list[int], run_one: Callable[[int, Path, bool], dict], out: Path, resume: bool = False) -> dict:
    """``run_one(seed, seed_dir, resume)`` for each seed (a finished seed is read back with ``resume``),
    then the across-seed tables. Returns the seeds dict also written to ``<out>/seeds.json``."""
    t0 = time.time()
    out = Path(out).resolve()
    if (out / "seeds.json").is_file() and not resume:
        raise UserError(f"--out {out}: a finished multi-seed run is already there; add --resume or choose another --out")
    for name in SEEDS_FILES:
        (out / name).unlink(missing_ok=True)
    per_seed: dict[int, dict] = {}
    for i, seed in enumerate(seeds, 1):
        seed_dir = out / f"seed{seed}"
        done = seed_dir / ("comparison.json" if (seed_dir / "comparison.json").is_file() else RESULTS_FILE)
        if resume and done.is_file():
            print(f"[seed {seed}, {i}/{len(seeds)}] finished earlier: read back from {seed_dir}", flush=True)
            per_seed[seed] = json.loads(done.read_text(encoding="utf-8"))
            continue
        print(f"[seed {seed}, {i}/{len(seeds)}] running in {seed_dir}", flush=True)
        per_seed[seed] = run_one(seed, seed_dir, resume and seed_dir.exists())
    long = aggregate(per_seed)
    result = {"seeds": seeds, "out": str(out), "wall_s": round(time.time() - t0, 1),
              "table": long.to_dict("records")}
    md = [f"# {len(seeds)} seeds ({', '.join(map(str, seeds))})", "", format_markdown(seeds_table(long)), "",
          "Mean ± sample std across seeds of the final meta-test accuracy (%); recovered: the mean share of the "
          "with-data gain over random_init (with-data trained for the same meta-updates), per shot. Each seed's "
          "own table, with 95% CIs over its meta-test tasks, is in its seed<k>/ directory; per-seed "
          "accuracies are in seeds.csv.", ""]
    _write_text(out / "seeds.md", "\n".join(md))
    with atomic_path(out / "seeds.csv") as tmp:
        long.to_csv(tmp, index=False)
    _write_text(out / "seeds.json", json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
    return result


__all__ = ["SEEDS_FILES", "aggregate", "default_seeds_dir", "parse_seeds", "run_seeds", "seeds_table"]
