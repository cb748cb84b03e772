#!/usr/bin/env python
"""Benchmark: FREE's recovery speed-up, meta-generator vs a generator from scratch, in one run.

    python benchmarks/free_recovery.py [--warmup 20] [--heldout 3] [--repeats 2] [--quick]

On the engine's glyph teacher zoo (``mr`` scenario; built under --data-root/zoo if missing):

1. Warm-up, as FREE's first 20 epochs: each round, ``--teachers-per-round`` teachers drawn from the
   warm-up teachers (all but the last ``--heldout``) adapt the meta-generator for ``--adapt-steps``
   steps (``adapt_generator``) and the meta-generator takes one Adam step on their mean first-order
   meta-gradient (``MetaGenerator.update``). Its wall time and teacher passes are reported: FREE's
   "Generation cost" left them out (bug B18).
2. On every held-out teacher, never seen in warm-up, and for ``--repeats`` latent seeds:
   ``recover_until`` the teacher's accuracy on the generated images reaches ``--target-acc``,
   starting from the warmed-up meta-generator ("meta") and from a freshly initialised generator
   ("scratch", TGR's per-teacher recovery). Same seed, latents and augmentation draws for both; only
   the generator's starting weights differ.
3. FREE-style line: the accuracy after ``--adapt-steps`` passes from the meta-generator and from
   scratch, and how many passes scratch needs to reach the meta-generator's accuracy. The paper's
   ~20x compares 5 meta-generator steps with a 200-step per-teacher budget, not passes to a fixed
   accuracy; both ratios are printed so the difference is visible.

"passes" = teacher forward+backward passes (= generator updates); accuracy probes are not counted
or timed. One torch thread by default, so the wall times are per core.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIRST_RECOVERY_SEED = 10_000     # latent seeds of the held-out recoveries, apart from the warm-up draws


@dataclass(frozen=True)
class BenchSettings:
    """Everything that decides what is measured (the generator shape and the optimiser are FREE's)."""
    nz: int = 256                   # FREE's latent size
    ngf: int = 16                   # the quick profile's generator width (FREE: 64, ~16x the conv cost)
    per_class: int = 20             # FREE's images per class per teacher
    lr_generator: float = 1e-3
    lr_latent: float = 1e-3
    augment: str = "crop_flip"
    bn_weight: float = 0.0          # FREE registers no BN-statistics hooks
    warmup: int = 20                # FREE's warm-up epochs
    teachers_per_round: int = 4     # FREE's teachers per epoch
    adapt_steps: int = 5            # FREE's generate_iterations
    heldout: int = 3
    repeats: int = 2
    target_acc: float = 0.9
    max_steps: int = 200            # TGR's per-teacher recovery budget
    seed: int = 0


@dataclass
class Pair:
    """One held-out teacher x latent seed: both starts measured with the same seed."""
    teacher: int                    # pool index
    seed: int
    meta: object                    # RecoverySpeed to target_acc from the meta-generator
    scratch: object                 # ... from a fresh generator
    meta_short: object              # RecoverySpeed after exactly adapt_steps passes (FREE's operating point)
    scratch_short: object
    scratch_to_meta_short: object   # scratch until it reaches meta_short.acc


@dataclass
class BenchResult:
    warmup_teachers: list[int]
    heldout_teachers: list[int]
    warmup_draws: list[list[int]] = field(default_factory=list)   # pool indices adapted in each round
    warmup_seconds: float = 0.0
    warmup_passes: int = 0
    meta_updates: int = 0
    pairs: list[Pair] = field(default_factory=list)


def run_benchmark(entries, mean, std, image_size: int, s: BenchSettings, device="cpu",
                  log: Callable[[str], None] = lambda _msg: None) -> BenchResult:
    """Warm up a meta-generator on the pool's first teachers, then time recoveries on the held-out ones.

    ``entries``: ``prepare_pool``'s list; the last ``s.heldout`` are the held-out test teachers.
    """
    import numpy as np
    import torch

    from raydfml.errors import UserError
    from raydfml.synthesis.free import MetaGenerator, adapt_generator, recover_until
    from raydfml.utils import seed_everything
    from raydfml.zoo import load_teacher

    if not 1 <= s.heldout < len(entries):
        raise UserError(f"--heldout {s.heldout}: need at least 1 held-out and 1 warm-up teacher "
                        f"(the pool has {len(entries)})")
    if s.warmup < 0 or s.teachers_per_round < 1 or s.repeats < 1 or s.adapt_steps < 1:
        raise UserError("--warmup must be >= 0 and --teachers-per-round, --repeats, --adapt-steps >= 1")
    seed_everything(s.seed)
    device = torch.device(device)
    warm_entries, test_entries = entries[: -s.heldout], entries[-s.heldout:]
    teachers = {e.index: load_teacher(e.zoo_dir, e.record, device) for e in entries}
    classes = {e.index: e.record.classes for e in entries}
    shape = dict(nz=s.nz, ngf=s.ngf, image_size=image_size)
    opt = dict(per_class=s.per_class, lr_generator=s.lr_generator, lr_latent=s.lr_latent, augment=s.augment,
               bn_weight=s.bn_weight)
    result = BenchResult([e.index for e in warm_entries], [e.index for e in test_entries])

    # 1. warm-up: meta-train the generator on the warm-up teachers only (CE, no student: FREE's warm-up)
    meta = MetaGenerator(**shape, lr=s.lr_generator, seed=s.seed, device=device)
    rng = np.random.default_rng([s.seed, 20])
    k = min(s.teachers_per_round, len(warm_entries))
    t0 = time.perf_counter()
    for r in range(s.warmup):
        picks = rng.choice(len(warm_entries), size=k, replace=False)
        seeds = rng.integers(0, 2**31 - 1, size=k)
        state = meta.state()
        recs = []
        for i, sd in zip(picks, seeds):
            e = warm_entries[int(i)]
            recs.append(adapt_generator(state, teachers[e.index], classes[e.index], mean, std, int(sd),
                                        steps=s.adapt_steps, **shape, **opt))
        info = meta.update([rec.state_grad for rec in recs])
        result.warmup_draws.append([warm_entries[int(i)].index for i in picks])
        result.warmup_passes += sum(rec.passes for rec in recs)
        if r == 0 or (r + 1) % 5 == 0 or r + 1 == s.warmup:
            accs = ", ".join(f"{rec.teacher_acc:.2f}" for rec in recs)
            log(f"  warm-up round {r + 1:3d}/{s.warmup}: teachers {result.warmup_draws[-1]} "
                f"acc after {s.adapt_steps} steps [{accs}]  |meta-grad| {info['grad_norm']:.3g}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.warmup_seconds = time.perf_counter() - t0
    result.meta_updates = meta.updates
    warm_state = meta.state()

    # 2./3. held-out teachers: meta-generator vs scratch, same seeds
    for e in test_entries:
        t, c = teachers[e.index], classes[e.index]
        for rep in range(s.repeats):
            sd = FIRST_RECOVERY_SEED + rep

            def run(start, target, budget):
                return recover_until(t, c, mean, std, target_acc=target, max_steps=budget, start_state=start,
                                     seed=sd, **shape, **opt)

            never = 1.01                      # an accuracy no run reaches: stop after exactly `budget` passes
            m, sc = run(warm_state, s.target_acc, s.max_steps), run(None, s.target_acc, s.max_steps)
            m5, s5 = run(warm_state, never, s.adapt_steps), run(None, never, s.adapt_steps)
            s_to_m5 = run(None, m5.acc, s.max_steps)
            result.pairs.append(Pair(e.index, sd, m, sc, m5, s5, s_to_m5))
            log(f"  teacher {e.index} seed {sd}: meta {m.passes} passes, scratch {sc.passes} passes")
    return result


def _ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}x" if b > 0 else ("  n/a" if a == 0 else "  inf")


def report(res: BenchResult, s: BenchSettings) -> list[str]:
    """The table and the summary lines (also used by the docs)."""
    L: list[str] = []
    tgt = f"{s.target_acc:.0%}"
    L.append(f"passes and wall seconds to {tgt} teacher accuracy on {s.per_class} images/class "
             f"(budget {s.max_steps}); 'reached' = acc >= target")
    L.append(f"{'teacher':>7} {'seed':>6} | {'meta passes':>11} {'meta s':>7} {'acc':>5} | "
             f"{'scratch passes':>14} {'scratch s':>9} {'acc':>5}")
    for p in res.pairs:
        L.append(f"{p.teacher:>7} {p.seed:>6} | {p.meta.passes:>11} {p.meta.seconds:>7.2f} {p.meta.acc:>5.2f} | "
                 f"{p.scratch.passes:>14} {p.scratch.seconds:>9.2f} {p.scratch.acc:>5.2f}")
    n = len(res.pairs)
    reached_m = sum(p.meta.acc >= s.target_acc for p in res.pairs)
    reached_s = sum(p.scratch.acc >= s.target_acc for p in res.pairs)

    def col(get):
        xs = [get(p) for p in res.pairs]
        return statistics.median(xs), statistics.fmean(xs)

    mp, sp = col(lambda p: p.meta.passes), col(lambda p: p.scratch.passes)
    mt, st = col(lambda p: p.meta.seconds), col(lambda p: p.scratch.seconds)
    L.append(f"reached {tgt}: meta {reached_m}/{n}, scratch {reached_s}/{n}")
    L.append(f"passes   median meta {mp[0]:6.1f}  scratch {sp[0]:6.1f}  ratio scratch/meta {_ratio(sp[0], mp[0])}"
             f" | mean meta {mp[1]:6.2f}  scratch {sp[1]:6.2f}  ratio {_ratio(sp[1], mp[1])}")
    L.append(f"wall s   median meta {mt[0]:6.2f}  scratch {st[0]:6.2f}  ratio scratch/meta {_ratio(st[0], mt[0])}"
             f" | mean meta {mt[1]:6.2f}  scratch {st[1]:6.2f}  ratio {_ratio(st[1], mt[1])}")
    saved = sp[1] - mp[1]
    L.append(f"warm-up cost (not in FREE's 'Generation cost', bug B18): {res.warmup_seconds:.1f} s wall, "
             f"{res.warmup_passes} passes ({s.warmup} rounds x {min(s.teachers_per_round, len(res.warmup_teachers))} "
             f"teachers x {s.adapt_steps} steps, {res.meta_updates} meta-updates)")
    if saved > 0:
        L.append(f"  break-even: the warm-up's passes equal the saving on {res.warmup_passes / saved:.0f} "
                 f"recoveries to {tgt} ({saved:.2f} passes saved per recovery)")
    else:
        L.append("  break-even: never (the meta-generator saved no passes on average)")
    m5, s5 = col(lambda p: p.meta_short.acc), col(lambda p: p.scratch_short.acc)
    catch = col(lambda p: p.scratch_to_meta_short.passes)
    caught = sum(p.scratch_to_meta_short.acc >= p.meta_short.acc for p in res.pairs)
    L.append(f"FREE-style: after {s.adapt_steps} passes, teacher accuracy mean meta {m5[1]:.3f} vs scratch "
             f"{s5[1]:.3f} (median {m5[0]:.3f} vs {s5[0]:.3f}); scratch reaches the meta-generator's "
             f"{s.adapt_steps}-pass accuracy in median {catch[0]:.0f} / mean {catch[1]:.1f} passes "
             f"({caught}/{n} within {s.max_steps}): scratch needs {_ratio(catch[1], s.adapt_steps).strip()} the passes "
             f"for the same accuracy.")
    L.append(f"  The paper's ~20x compares {s.adapt_steps} meta-generator steps with TGR's {s.max_steps}-step "
             f"per-teacher budget ({s.max_steps / s.adapt_steps:.0f}x passes by construction, whatever accuracy "
             f"either reaches), not passes to a fixed accuracy as above.")
    return L


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchSettings()
    p.add_argument("--profile", default="quick", help="config profile for the teacher pool (default quick)")
    p.add_argument("--dataset", default="glyphs")
    p.add_argument("--data-root", default="data")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda[:N] or auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-core times)")
    p.add_argument("--workers", type=int, default=0,
                   help="Ray tasks to build a missing zoo with (default 0: in-process)")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"warm-up rounds (default {d.warmup}, FREE's)")
    p.add_argument("--teachers-per-round", type=int, default=d.teachers_per_round)
    p.add_argument("--adapt-steps", type=int, default=d.adapt_steps,
                   help=f"meta-generator adaptation steps per teacher (default {d.adapt_steps}, FREE's)")
    p.add_argument("--heldout", type=int, default=d.heldout, help="last N pool teachers held out (default 3)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="latent seeds per held-out teacher")
    p.add_argument("--target-acc", type=float, default=d.target_acc)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--nz", type=int, default=d.nz)
    p.add_argument("--ngf", type=int, default=d.ngf)
    p.add_argument("--per-class", type=int, default=d.per_class)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true", help="10 warm-up rounds, 1 seed, 10 images/class (~1 min)")
    args = p.parse_args()

    import torch

    from raydfml.config import resolve
    from raydfml.data.layout import ensure_dataset
    from raydfml.data.registry import get_spec
    from raydfml.errors import UserError
    from raydfml.runtime.pool import prepare_pool
    from raydfml.utils import resolve_device

    if args.quick:
        args.warmup, args.repeats, args.per_class = min(args.warmup, 10), 1, min(args.per_class, 10)
    torch.set_num_threads(max(1, args.threads))
    try:
        device = resolve_device(args.device)
        cfg = resolve("mr", "deepinv", args.profile, {"data.dataset": args.dataset, "data.data_root": args.data_root,
                                                       "runtime.device": str(device)})
        ensure_dataset(Path(args.data_root).resolve(), cfg.data.dataset)
        entries = prepare_pool(cfg, workers=args.workers, progress=True)
        spec = get_spec(cfg.data.dataset)
        s = BenchSettings(nz=args.nz, ngf=args.ngf, per_class=args.per_class, lr_generator=cfg.synth.lr_generator,
                          lr_latent=cfg.synth.lr_latent, augment=cfg.synth.augment, warmup=args.warmup,
                          teachers_per_round=args.teachers_per_round, adapt_steps=args.adapt_steps,
                          heldout=args.heldout, repeats=args.repeats, target_acc=args.target_acc,
                          max_steps=args.max_steps, seed=args.seed)
        size = cfg.data.image_size or spec.image_size
        print(f"FREE recovery speed: {len(entries)} {cfg.data.dataset} {'/'.join(cfg.pool.archs)} teachers "
              f"({len(entries) - s.heldout} warm-up, last {s.heldout} held out), generator nz {s.nz} ngf {s.ngf}, "
              f"{s.per_class} images/class, lr {s.lr_generator:g}, device {device}, {torch.get_num_threads()} "
              f"thread(s), load average {os.getloadavg()[0]:.2f}", flush=True)
        t0 = time.perf_counter()
        res = run_benchmark(entries, spec.mean, spec.std, size, s, device=device, log=lambda m: print(m, flush=True))
    except UserError as exc:
        sys.exit(f"error: {exc}")
    print()
    print("\n".join(report(res, s)))
    print(f"total {time.perf_counter() - t0:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
