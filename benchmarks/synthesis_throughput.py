#!/usr/bin/env python
"""Benchmark: white-box synthesis throughput, in-process vs 1 and 2 TeacherPool actors, in one run.

    python benchmarks/synthesis_throughput.py [--teachers 8] [--steps 50] [--dataset glyphs]

Every variant inverts the same teachers with the same seeds (so the work is identical) and
prints images/s and the ratios the engine issue asks for: 2 actors / 1 actor (goal >= 1.7 on two
cores) and Ray 1 actor / in-process (goal >= 0.9, i.e. Ray at most 10% slower). The in-process
variant uses one torch thread, like an actor, so the comparison is per core.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", type=int, default=8, help="teacher recoveries per variant (default 8)")
    p.add_argument("--steps", type=int, default=None, help="inversion steps per teacher (default: the profile's)")
    p.add_argument("--profile", default="quick")
    p.add_argument("--dataset", default="glyphs")
    p.add_argument("--data-root", default="data")
    p.add_argument("--repeats", type=int, default=1, help="repeat each variant and keep the best time")
    args = p.parse_args()

    import ray
    import torch

    from raydfml.config import resolve
    from raydfml.data.layout import ensure_dataset
    from raydfml.cluster import ensure_ray
    from raydfml.runtime.pool import prepare_pool
    from raydfml.runtime.teacher_pool import TeacherPool

    overrides = {"data.dataset": args.dataset, "data.data_root": args.data_root, "runtime.device": "cpu"}
    if args.steps:
        overrides["synth.steps"] = args.steps
    cfg = resolve("mr", "deepinv", args.profile, overrides)
    ensure_dataset(Path(args.data_root).resolve(), args.dataset)
    ensure_ray(num_cpus=os.cpu_count())
    entries = prepare_pool(cfg, workers=2, progress=False)
    ids = [i % len(entries) for i in range(args.teachers)]
    images_per_call = cfg.synth.per_class * cfg.pool.way
    total_images = images_per_call * len(ids)

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    # in-process, one thread (the per-core reference)
    torch.set_num_threads(1)
    local = TeacherPool(cfg.to_dict(), entries, device="cpu")
    # TeacherPool.work(hook, round, teachers, per_teacher, theta, needs): recovery only (no gradient)
    local.work("recover", 0, ids[:1], None, None, None)             # warm-up: load teachers, allocate
    t_local = timed(lambda: local.work("recover", 1, ids, None, None, None))

    actor_cls = ray.remote(TeacherPool).options(num_cpus=1, num_gpus=0)

    def ray_variant(n: int) -> float:
        actors = [actor_cls.remote(cfg.to_dict(), entries) for _ in range(n)]
        ray.get([a.work.remote("recover", 0, ids[:1], None, None, None) for a in actors])   # warm-up
        shares = [ids[i::n] for i in range(n)]
        t = timed(lambda: ray.get([a.work.remote("recover", 1, s, None, None, None) for a, s in zip(actors, shares)]))
        for a in actors:
            ray.kill(a)
        return t

    t_ray1 = ray_variant(1)
    t_ray2 = ray_variant(2)
    print(f"synthesis throughput, {len(ids)} teacher recoveries x {images_per_call} images, "
          f"{cfg.synth.steps} steps each ({args.profile} profile, {os.cpu_count()} cores)")
    for name, t in [("in-process (1 thread)", t_local), ("Ray, 1 TeacherPool actor", t_ray1),
                    ("Ray, 2 TeacherPool actors", t_ray2)]:
        print(f"  {name:28s} {t:7.2f} s  {total_images / t:8.1f} images/s")
    print(f"  ratio 2 actors / 1 actor      {t_ray1 / t_ray2:5.2f}x  (goal >= 1.7)")
    print(f"  ratio Ray 1 actor / in-process {t_local / t_ray1:5.2f}x  (goal >= 0.90)")


if __name__ == "__main__":
    main()
