"""``python -m raydfml.zoo``: train a pool of teachers in parallel on Ray and write its manifest."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import run_cli
from ..models import ARCHS
from .build import POLICIES, ZooConfig, build_zoo, default_zoo_dir

EPOCHS_BY_PROFILE = {"smoke": 1, "quick": 4, "paper": 60}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m raydfml.zoo",
        description="Train N teacher classifiers on class subsets of a dataset's meta-train split, in parallel "
                    "on Ray, and write <zoo-dir>/manifest.csv plus one state-dict file per teacher. "
                    "Teachers whose file still matches its checksum are skipped, so re-running is a no-op.")
    p.add_argument("--dataset", default="glyphs", help="dataset name (default: glyphs, generated if missing)")
    p.add_argument("--arch", default="conv4", help=f"teacher architecture: {', '.join(ARCHS)}")
    p.add_argument("--num", type=int, default=10, help="number of teachers (default 10)")
    p.add_argument("--way", type=int, default=5, help="classes per teacher (default 5)")
    p.add_argument("--policy", default="random", help=f"class subsets: {' | '.join(POLICIES)} (default random)")
    p.add_argument("--seed", type=int, default=0, help="seed for class subsets and training (default 0)")
    p.add_argument("--profile", default="quick", choices=sorted(EPOCHS_BY_PROFILE),
                   help="sets --epochs: smoke 1, quick 4, paper 60 (default quick)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (overrides --profile)")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (narrow ResNets on CPU)")
    p.add_argument("--optimizer", default="seeds", choices=("seeds", "adam"),
                   help="seeds: conv4 Adam, ResNets SGD 0.01 (long schedules); adam: Adam 0.01 for all (short CPU schedules)")
    p.add_argument("--workers", type=int, default=2, help="teachers trained at once on Ray; 0 = in-process")
    p.add_argument("--data-root", default="data", help="dataset root in the seeds' layout (default ./data)")
    p.add_argument("--zoo-dir", default=None, help="output directory (default <data-root>/zoo/<derived name>)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (in-process mode; Ray workers use their GPU share)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
    return p.parse_args(argv)


def parse_import_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m raydfml.zoo import",
        description="Turn a folder of your teacher checkpoints (plain state dicts of a registered backbone, the "
                    "seeds' {'teacher', 'specific'} files, or torchvision-style ResNets) into a zoo with a "
                    "manifest; runs then use it with --zoo-dir and never train over it.")
    p.add_argument("src", help="folder of *.pt / *.pth teacher checkpoints")
    p.add_argument("--zoo-dir", required=True, help="the zoo folder to write (new, or an earlier import)")
    p.add_argument("--arch", required=True, help="the teachers' backbone (a registered name, e.g. conv4)")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier of the backbone (default 1)")
    p.add_argument("--dataset", default="glyphs", help="the dataset whose meta-train classes they know (name or folder)")
    p.add_argument("--data-root", default="data", help="dataset root in the seeds' layout (default ./data)")
    p.add_argument("--classes", default=None,
                   help="CSV 'file,classes' (classes ';'-separated) or JSON {file: [classes]}: each teacher's "
                        "classes as meta-train class names or ids (the seeds' files carry them already)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["import"]:
        from .importer import import_teachers

        a = parse_import_args(argv[1:])
        records = import_teachers(a.src, a.zoo_dir, a.dataset, a.arch, Path(a.data_root).resolve(),
                                  width=a.width, classes_file=a.classes)
        print(f"zoo: {len(records)} imported teachers in {Path(a.zoo_dir).resolve()}; use it with --zoo-dir")
        return 0
    args = parse_args(argv)
    cfg = ZooConfig(dataset=args.dataset, arch=args.arch, num=args.num, way=args.way, policy=args.policy,
                    seed=args.seed, epochs=args.epochs or EPOCHS_BY_PROFILE[args.profile], width=args.width,
                    optimizer=args.optimizer)
    cfg.validate()
    data_root = Path(args.data_root).resolve()
    zoo_dir = Path(args.zoo_dir).resolve() if args.zoo_dir else default_zoo_dir(data_root, cfg)
    if args.address and args.workers > 0:
        from ..cluster import ensure_ray

        ensure_ray(address=args.address)
    t0 = time.time()
    records = build_zoo(cfg, zoo_dir, data_root, workers=args.workers, device=args.device)
    accs = [r.heldout_acc for r in records]
    print(f"zoo: {len(records)} teachers in {zoo_dir} ({time.time() - t0:.1f}s); held-out accuracy "
          f"min {min(accs):.3f} mean {sum(accs) / len(accs):.3f} max {max(accs):.3f}")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
