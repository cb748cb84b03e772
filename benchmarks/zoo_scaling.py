#!/usr/bin/env python
"""Benchmark: the same teacher zoo built with 1 and with 2 Ray workers in one run, and where the time goes.

    python benchmarks/zoo_scaling.py [--num 6] [--arch conv4] [--profile quick] [--dataset glyphs]
        [--data-root data] [--repeats 1] [--malloc-defaults]

Every variant builds the same zoo (``--num`` teachers, the profile's epochs, seed 0) into a fresh
temporary directory, on a Ray instance of its own (started before the build and timed apart), so each
pays the same cold start: worker processes that import torch on their first teacher. The split is
decoded into its cache once before the first variant. Per variant it prints build_zoo's wall time and
its parts (the driver reading the split and putting it into the object store once, the workers'
start-up, the teachers' data, training and held-out evaluation, the kernel time and page faults inside
training, the driver writing teacher files and the manifest, how busy the workers were), then the
ratio 1 worker / 2 workers (goal >= 1.8 on two idle cores), without and with Ray's start, and whether
both builds wrote byte-identical teacher files (they must: each teacher is seeded by its id alone).

``--malloc-defaults`` adds both builds with glibc's malloc defaults in the workers
(``RAYDFML_KEEP_FREED_MEMORY=0``, see ``raydfml.zoo.build.keep_freed_memory``): what that setting saves.
With ``--repeats N`` each variant is built N times and the fastest build is kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = [  # (label, breakdown key, how to show it)
    ("Ray start (not in the wall above)", "ray_start", "s"),
    ("driver: read the split", "data", "s"),
    ("driver: split into the object store", "put", "s"),
    ("worker start-up (1st teacher's wait)", "worker_start", "s"),
    ("teachers: data (sum)", "teacher_data", "s"),
    ("teachers: training (sum)", "train", "s"),
    ("teachers: evaluation (sum)", "evaluate", "s"),
    ("teachers: CPU time per teacher (mean)", "cpu_per_teacher", "s"),
    ("teachers: kernel CPU time (sum)", "system", "s"),
    ("teachers: page faults (sum)", "page_faults", "M"),
    ("driver: files + manifest", "write", "s"),
    ("workers busy", "busy", "%"),
    ("torch threads per worker", "threads", "n"),
]


def build_once(cfg, data_root: Path, workers: int, cpus: int, keep_freed_memory: bool):
    """One cold build: a fresh Ray, the zoo into a temporary directory; (BuildTimes, sha256 per teacher)."""
    import ray

    from raydfml.cluster import ensure_ray
    from raydfml.zoo import BuildTimes, build_zoo

    if ray.is_initialized():
        ray.shutdown()
    # The local Ray's processes inherit this environment, so its workers see the switch.
    os.environ["RAYDFML_KEEP_FREED_MEMORY"] = "1" if keep_freed_memory else "0"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    ensure_ray(num_cpus=cpus)
    ray_start = time.perf_counter() - t0
    times = BuildTimes()
    with tempfile.TemporaryDirectory(prefix="zoo_scaling_") as zoo_dir:
        records = build_zoo(cfg, zoo_dir, data_root, workers=workers, progress=False, times=times)
    ray.shutdown()
    times.ray_start = ray_start
    if keep_freed_memory and not all(t.kept_freed_memory for t in times.teachers):
        print("  (note: glibc's mallopt was not available in the workers; the setting had no effect)")
    return times, [r.sha256 for r in records], load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=6, help="teachers in the zoo (default 6)")
    p.add_argument("--arch", default="conv4")
    p.add_argument("--profile", default="quick", choices=("smoke", "quick", "paper"), help="sets the epochs")
    p.add_argument("--dataset", default="glyphs")
    p.add_argument("--data-root", default="data")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of each variant's Ray (default: all)")
    p.add_argument("--repeats", type=int, default=1, help="builds per variant; the fastest is kept")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="also build with glibc's malloc defaults in the workers (RAYDFML_KEEP_FREED_MEMORY=0)")
    args = p.parse_args()

    from raydfml.data.layout import ensure_dataset, load_split
    from raydfml.data.registry import get_spec
    from raydfml.zoo import ZooConfig
    from raydfml.zoo.__main__ import EPOCHS_BY_PROFILE

    data_root = Path(args.data_root).resolve()
    cfg = ZooConfig(dataset=args.dataset, arch=args.arch, num=args.num, epochs=EPOCHS_BY_PROFILE[args.profile],
                    width=0.125 if args.arch != "conv4" else 1.0, optimizer="adam")
    cfg.validate()
    ensure_dataset(data_root, cfg.dataset)
    load_split(data_root, cfg.dataset, "meta_train", image_size=get_spec(cfg.dataset).image_size)   # warm cache

    variants = [(f"{w} worker{'s' * (w > 1)}", w, True) for w in (1, 2)]
    if args.malloc_defaults:          # starred: glibc's malloc defaults in the workers
        variants += [(f"{w} worker{'s' * (w > 1)}*", w, False) for w in (1, 2)]
    results = {}
    for name, workers, keep in variants:
        best = None
        for _ in range(args.repeats):
            print(f"building ({name}) ...", flush=True)
            run = build_once(cfg, data_root, workers, args.cpus, keep)
            if best is None or run[0].total < best[0].total:
                best = run
        results[name] = best

    print(f"\nzoo build scaling: {cfg.num} {cfg.arch} teachers on {cfg.dataset}, {cfg.epochs} epochs "
          f"({args.profile} profile), batch {cfg.batch_size}; Ray with {args.cpus} CPUs, {os.cpu_count()} cores")
    names = list(results)
    width = 12
    print(f"  {'':38s}" + "".join(f"{n:>{width}s}" for n in names))
    print(f"  {'load average before':38s}" + "".join(f"{results[n][2]:>{width}.1f}" for n in names))
    print(f"  {'build wall (build_zoo)':38s}" + "".join(f"{results[n][0].total:>{width - 2}.1f} s" for n in names))
    for label, key, unit in ROWS:
        cells = []
        for n in names:
            v = results[n][0].breakdown()[key]
            cells.append(f"{v:>{width - 2}.1f} s" if unit == "s" else f"{100 * v:>{width - 2}.0f} %" if unit == "%"
                         else f"{v / 1e6:>{width - 2}.2f} M" if unit == "M" else f"{v:>{width}.0f}")
        print(f"  {label:38s}" + "".join(cells))
    for suffix in ("", "*"):
        one, two = results.get(f"1 worker{suffix}"), results.get(f"2 workers{suffix}")
        if one and two:
            t1, t2 = one[0], two[0]
            print(f"  ratio 1 worker{suffix} / 2 workers{suffix}: {t1.total / t2.total:.2f}x (goal >= 1.8); with Ray's start "
                  f"{(t1.total + t1.ray_start) / (t2.total + t2.ray_start):.2f}x")
    if args.malloc_defaults:
        print("  * glibc's malloc defaults in the workers (RAYDFML_KEEP_FREED_MEMORY=0)")
    digests = {n: r[1] for n, r in results.items()}
    same = len({tuple(d) for d in digests.values()}) == 1
    print(f"  same teacher files in every build: {'yes' if same else 'NO'} ({len(digests[names[0]])} sha256 compared)")


if __name__ == "__main__":
    main()
