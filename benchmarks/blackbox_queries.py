#!/usr/bin/env python
"""Benchmark: what black-box recovery costs (queries, wall time) and how good its gradients are, per q.

    python benchmarks/blackbox_queries.py [--qs 1,10,100] [--teachers 2] [--steps 60] [--per-class 5] [--smoke]

On the engine's glyph teacher zoo (scenario ``ss``; built under --data-root if missing), for every q:

1. the zero-order estimate's cosine with the true input gradient of the per-sample CE, on a batch of
   generator images, against one teacher seen as a white box (the reference) and as an API with
   float inputs (the estimate; 8-bit inputs add quantisation on top); theory for a smooth loss:
   about sqrt(q / d) (d = 3 * size^2);
2. one ``ZeroOrderRecovery`` per teacher through an 8-bit probabilities API: images sent, API calls,
   wall time and the API's accuracy on the kept images (what one BiDf-MKD support set costs).

One torch thread, so the wall times are per core. One table, q by q, side by side.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--qs", default="1,10,100", help="directions per image, comma-separated")
    p.add_argument("--teachers", type=int, default=2, help="teachers recovered per q")
    p.add_argument("--steps", type=int, default=60, help="generator steps per recovery (default 60)")
    p.add_argument("--per-class", type=int, default=5, help="images per class (default 5)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--smoke", action="store_true", help="the smoke glyph set and zoo (seconds; for tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from raydfml.blackbox import BlackBoxAPI, ZeroOrderRecovery, zo_gradient
    from raydfml.blackbox.zeroorder import api_cross_entropy
    from raydfml.config import resolve
    from raydfml.data.layout import ensure_dataset
    from raydfml.data.registry import get_spec
    from raydfml.runtime.pool import prepare_pool
    from raydfml.zoo import load_teacher

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cfg = resolve("ss", None, "smoke" if args.smoke else "quick",
                  {"data.data_root": args.data_root, "runtime.workers": 0, "runtime.device": "cpu"})
    ensure_dataset(Path(args.data_root), cfg.data.dataset)
    entries = prepare_pool(cfg, workers=0, progress=False)[: args.teachers]
    spec = get_spec(cfg.data.dataset)
    size = spec.image_size
    d = 3 * size * size
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def api_of(e, **kw):
        return BlackBoxAPI(load_teacher(e.zoo_dir, e.record, "cpu"), spec.mean, spec.std, name=f"teacher {e.index}",
                           classes=e.global_classes, image_size=e.record.image_size, **kw)

    # a fixed batch of smooth, off-grid images: a fresh generator's output (what a recovery starts from)
    from raydfml.models import Generator

    gen = Generator(nz=32, ngf=16, image_size=size)
    gen.reset_parameters()
    with torch.no_grad():
        x = gen(torch.randn(20, 32)).clamp(0, 1)
    y = torch.arange(20) % cfg.pool.way
    white = load_teacher(entries[0].zoo_dir, entries[0].record, "cpu").eval()
    xr = x.clone().requires_grad_(True)
    true = torch.autograd.grad(F.cross_entropy(white((xr - mean) / std), y, reduction="sum"), xr)[0]

    rows = []
    for q in [int(v) for v in args.qs.split(",")]:
        api = api_of(entries[0], input="float")
        est = zo_gradient(api_cross_entropy(api, y), x, q=q, generator=torch.Generator().manual_seed(args.seed),
                          chunks=max(1, q // 20))
        cos = F.cosine_similarity(est.grad.flatten(1), true.flatten(1), dim=1)
        rec = ZeroOrderRecovery(image_size=size, per_class=args.per_class, steps=args.steps, q=q,
                                chunks=max(1, q // 20), ngf=cfg.synth.ngf, nz=cfg.synth.nz,
                                augment=cfg.synth.augment)
        per_task = []
        for e in entries:
            t0 = time.perf_counter()
            out = rec.synthesize(api_of(e), e.global_classes, seed=args.seed + e.index)
            per_task.append((out.queries, out.calls, time.perf_counter() - t0, out.teacher_acc))
        n = len(per_task)
        rows.append({"q": q, "cosine": float(cos.mean()), "theory": math.sqrt(q / d),
                     "images_per_task": sum(t[0] for t in per_task) / n, "calls_per_task": sum(t[1] for t in per_task) / n,
                     "seconds_per_task": sum(t[2] for t in per_task) / n, "api_acc": sum(t[3] for t in per_task) / n})

    print(f"{cfg.data.dataset}, {size} px (d = {d}), {len(entries)} teacher(s), {args.steps} steps, "
          f"{args.per_class} images per class; cosine on 20 generator images, float API")
    print(f"{'q':>5} {'cosine':>7} {'sqrt(q/d)':>9} {'images/task':>12} {'calls/task':>10} {'s/task':>8} {'API acc':>8}")
    for r in rows:
        print(f"{r['q']:>5} {r['cosine']:>7.3f} {r['theory']:>9.3f} {r['images_per_task']:>12.0f} "
              f"{r['calls_per_task']:>10.0f} {r['seconds_per_task']:>8.2f} {r['api_acc']:>8.2f}")
    return rows


if __name__ == "__main__":
    main()
