"""What a GPU (or several) buys: a few rounds at the paper profile's sizes, with full-width teachers,
and where each round's time goes.

    python benchmarks/gpu_check.py [--scenario ma] [--method free] [--rounds 3] [--workers 2]
        [--teachers 4] [--data-root data] [--out runs/gpu_check] [--device auto] [--profile paper]

One engine run (the paper profile: 200 inversion steps, 30 images per class, full-width ResNets;
``--teachers`` per architecture, trained for one epoch since only their cost matters here). Printed and
written to ``<out>/gpu_check.json``: the zoo build time, rounds/s and recovered images/s, and the share
of a round spent on the TeacherPool actors (synthesis and the per-teacher work, parallel across actors)
against the MetaLearner (replay, validation) and the driver (the rest): the serial share that bounds
how far more GPUs (more actors) can speed a round up (Amdahl: at most 1 / serial share).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="ma")
    p.add_argument("--method", default="free")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="TeacherPool actors (one GPU share each)")
    p.add_argument("--teachers", type=int, default=4, help="teachers per architecture")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", default="paper", help="paper (the point of the check); smoke to try the script")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import pandas as pd
    import torch

    from raydfml.config import resolve
    from raydfml.experiment import prepare_experiment, run_dir_for, run_method

    cfg = resolve(args.scenario, args.method, args.profile, {
        "data.data_root": args.data_root, "runtime.workers": args.workers, "runtime.device": args.device,
        "train.rounds": args.rounds, "train.eval_every": args.rounds, "train.val_tasks": 20, "train.test_tasks": 20,
        "train.baselines": "random_init", "pool.num_per_arch": args.teachers, "pool.epochs": 1,
        **({"pool.width": 1.0} if args.profile == "paper" else {}),
        **({"free.warmup": 0} if args.method == "free" else {})})
    cfg.out = str(Path(args.out).resolve())
    run_dir = run_dir_for(cfg)
    t0 = time.time()
    entries = prepare_experiment(cfg, progress=True)
    zoo_s = time.time() - t0
    t1 = time.time()
    results = run_method(cfg, run_dir, entries, progress=True)
    m = pd.read_csv(run_dir / "metrics.csv")
    round_s = float(m["time/round_s"].sum())
    synth = float(m.get("time/synthesis_s", pd.Series([0.0])).fillna(0).sum())
    central = float(sum(m[c].fillna(0).sum() for c in ("time/replay_s", "time/val_s", "time/second_pass_s")
                        if c in m))
    images = float(m.get("bank/images", pd.Series([0])).max() or 0)
    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "gpus": torch.cuda.device_count(), "workers": args.workers, "scenario": args.scenario,
           "method": args.method, "teachers": len(entries), "zoo_build_s": round(zoo_s, 1),
           "rounds": args.rounds, "rounds_per_s": round(args.rounds / round_s, 4),
           "banked_images_per_s": round(images / round_s, 1),
           "share_actors": round(synth / round_s, 3), "share_meta_learner": round(central / round_s, 3),
           "share_driver": round(max(0.0, 1 - (synth + central) / round_s), 3),
           "run_s": round(time.time() - t1, 1), "meta_test": results["meta_test"]}
    out["max_speedup_from_more_actors"] = round(1 / max(1e-9, 1 - out["share_actors"]), 2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(out, indent=2))
    for k, v in out.items():
        if k != "meta_test":
            print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()
