"""The ``launch.py`` command line (kept in the package so tests and Tune can call it)."""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def parse_args(argv=None) -> argparse.Namespace:
    from raydfml.config import DEFAULT_METHOD, PROFILES, SCENARIOS
    from raydfml.methods import method_names

    p = argparse.ArgumentParser(
        prog="launch.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a few-shot learner from a pool of teachers without their data, on Ray.",
        epilog="Examples:\n  python launch.py --scenario mr\n  python launch.py --scenario mr --profile smoke --workers 0\n"
               "  python launch.py --scenario mr --set learner.inner_lr=0.05 --set train.rounds=40\n"
               "  python launch.py --scenario ma --method tgr --set tgr.groups=4 --set igr.eta=0.01\n"
               "  python launch.py --scenario mr --set aggregate.weighting=uncertainty   # MTM task weighting\n"
               "  python launch.py --scenario mr --set train.source=real                 # meta-train on real episodes\n\n"
               "Options of a method or an aggregation rule live in the section named after it (free.warmup,\n"
               "purer.adv_start, tgr.groups, align.scale, igr.form); the shared sections are data, pool, synth,\n"
               "learner, train, runtime, aggregate and weighting (see raydfml/config.py and raydfml/methods/).")
    p.add_argument("--scenario", default="mr", help=f"teacher-pool scenario: {', '.join(SCENARIOS)} (default mr)")
    p.add_argument("--method", default=None,
                   help=f"method: {', '.join(method_names())} (default: the scenario's, "
                        f"{', '.join(f'{s} {m}' for s, m in DEFAULT_METHOD.items())}); several, comma-separated "
                        "(e.g. deepinv,purer), train each on the same pool and print one comparison table")
    p.add_argument("--profile", default="quick", help=f"compute budget: {', '.join(PROFILES)} (default quick)")
    p.add_argument("--dataset", default=None, help="dataset name (default: glyphs, generated when missing), or the path of "
                                               "your own folder in the seeds' layout (meta_train/<class>/<images>, ...)")
    p.add_argument("--data-root", default=None, help="root of datasets in the seeds' layout (default ./data)")
    p.add_argument("--zoo-dir", default=None, help="teacher zoo directory (default <data-root>/zoo/<derived>); with several "
                                               "architectures or domains (ma, md), one sub-folder per zoo inside it")
    p.add_argument("--out", default=None, help="run directory (default runs/<scenario>-<method>-<profile>-s<seed>-<hash of the options>; "
                                               "for several methods runs/compare-<scenario>-<profile>-s<seed>)")
    p.add_argument("--workers", type=int, default=None, help="TeacherPool actors on Ray; 0 runs in-process (default 2)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, default=0, help="experiment seed (default 0)")
    p.add_argument("--seeds", default=None, metavar="0,1,2",
                   help="several seeds, comma-separated: one run (or comparison) per seed in <out>/seed<k>/, then "
                        "mean ± std across seeds in <out>/seeds.md (default <out>: runs/<scenario>-<method or "
                        "compare>-<profile>-seeds<k-...>)")
    p.add_argument("--address", default=None, help="Ray cluster address, e.g. auto (default: start a local Ray)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (a comparison: finished methods "
                        "are read back, an unfinished one continues)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. learner.inner_lr=0.05 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--config", default=None, metavar="RUN.yaml",
                   help="launch options from a YAML file (keys as the options without dashes, e.g. scenario: ma, "
                        "set: {train.rounds: 24}); options on the command line win")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module first (repeatable): its @register_backbone / @register_method / "
                        "rule / synthesizer registrations become choices, and reach the Ray workers by value")
    t = p.add_argument_group("sweeps (Ray Tune)")
    t.add_argument("--tune", default=None, metavar="SWEEP.yaml",
                   help="run the sweep in this file (e.g. tune_configs/smoke.yaml) instead of one experiment; "
                        "with --resume, continue an interrupted sweep")
    t.add_argument("--num-samples", type=int, default=None, help="samples per grid point (overrides the sweep file)")
    t.add_argument("--storage", default=None, help="directory for sweep results (default ./runs/tune; made absolute)")
    argv = list(argv) if argv is not None else None
    first = p.parse_args(argv)
    if first.config:
        p.set_defaults(**_config_file_defaults(p, first.config))
        first = p.parse_args(argv)
    first.explicit = _explicit_options(p, argv)
    return first


def _explicit_options(p: argparse.ArgumentParser, argv) -> set[str]:
    """Destinations the user gave on the command line or in --config (for --tune's refusal)."""
    import sys

    given = set()
    for tok in (sys.argv[1:] if argv is None else argv):
        if tok.startswith("--"):
            for action in p._actions:
                if tok.split("=", 1)[0] in action.option_strings:
                    given.add(action.dest)
    defaults = {a.dest: a.default for a in p._actions}
    return given | {d for d, v in p._defaults.items() if d in defaults and v != defaults.get(d)}


def _config_file_defaults(p: argparse.ArgumentParser, path: str) -> dict:
    """``--config RUN.yaml``: a mapping of launch options; unknown keys are one-line errors."""
    import yaml

    from raydfml.errors import UserError

    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise UserError(f"--config {path}: expected a mapping of launch options, got {type(doc).__name__}")
    dests = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in doc.items():
        dest = str(key).replace("-", "_")
        if dest not in dests:
            raise UserError(f"--config {path}: unknown option {key!r}; choose from "
                            f"{', '.join(sorted(d.replace('_', '-') for d in dests))}")
        if dest == "set":
            if not isinstance(value, dict):
                raise UserError(f"--config {path}: 'set' must be a mapping of config keys to values")
            value = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in value.items()]
        elif dest == "plugin" and isinstance(value, str):
            value = [value]
        out[dest] = value
    return out


def set_overrides(items) -> dict:
    """``--set KEY=VALUE`` items as ``{key: value}``; an item without ``=`` is a one-line UserError."""
    from raydfml.errors import UserError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def method_names(value: str | None) -> list[str | None]:
    """``--method``'s comma-separated names, each checked against the registered methods up front
    (``[None]`` without ``--method``: the scenario's default method, resolved by config.resolve)."""
    from raydfml.errors import UserError
    from raydfml.methods import method_names

    if value is None:
        return [None]
    names = [m.strip() for m in value.split(",")]
    for name in names:
        if name not in method_names():
            what = "an empty name" if not name else repr(name)
            raise UserError(f"--method {value!r}: {what} is not a method; choose from {', '.join(method_names())}")
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"--method {value!r}: {name} is listed twice")
    return names


def build_config(args: argparse.Namespace, method: str | None = None, seed: int | None = None):
    """The resolved config of ``args`` (for ``method`` and ``seed`` when given, else ``args``')."""
    from raydfml.config import resolve

    overrides = set_overrides(args.set)
    for key, val in [("data.dataset", args.dataset), ("data.data_root", args.data_root), ("pool.zoo_dir", args.zoo_dir),
                     ("runtime.workers", args.workers), ("runtime.device", args.device),
                     ("runtime.address", args.address)]:
        if val is not None:
            overrides[key] = val
    cfg = resolve(args.scenario, method or args.method, args.profile, overrides,
                  seed=args.seed if seed is None else seed)
    if args.out:
        cfg.out = args.out
    return cfg


def main(argv=None) -> int:
    from raydfml.plugins import import_plugins

    args = parse_args(argv)
    import_plugins(args.plugin)               # before --method is checked: a plug-in may add a method
    methods = method_names(args.method)
    if args.tune:
        from raydfml.errors import UserError
        from raydfml.tune import run_sweep

        ignored = sorted(args.explicit & {"scenario", "method", "profile", "out", "workers", "seed", "print_config"})
        if ignored:
            raise UserError(f"--tune {args.tune}: {', '.join('--' + d.replace('_', '-') for d in ignored)} would be "
                            "ignored (the sweep file sets them; --set, --dataset, --data-root, --zoo-dir, --device "
                            "apply to every trial)")

        if args.seeds is not None:
            raise UserError("--seeds with --tune: make seed a dimension of the sweep's space instead "
                            "(space: {seed: {grid: [0, 1, 2]}})")

        overrides = dict(item.split("=", 1) for item in args.set if "=" in item)
        for key, val in [("data.dataset", args.dataset), ("data.data_root", args.data_root), ("pool.zoo_dir", args.zoo_dir),
                         ("runtime.device", args.device)]:
            if val is not None:
                overrides[key] = val
        out = run_sweep(args.tune, num_samples=args.num_samples, storage=args.storage, resume=args.resume,
                        address=args.address, quiet=args.quiet,
                        overrides={k.strip(): v.strip() for k, v in overrides.items()})
        return 0 if out["complete"] and not out["errors"] else 1
    if args.seeds is not None:
        return several_seeds(args, methods)
    if len(methods) > 1:
        return compare(args, methods)
    from raydfml.report import domain_tables, results_table
    from raydfml.experiment import run_experiment

    cfg = build_config(args, methods[0])
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    results = run_experiment(cfg, resume=args.resume, progress=not args.quiet)
    domains = domain_tables(results)
    print(("mean over domains\n" if domains else "") + results_table(results).to_string())
    for domain, table in domains.items():
        print(f"\n{domain}\n{table.to_string()}")
    from raydfml.diagnostics import coverage_line, recovered_line

    if results.get("recovered"):
        print("\n" + recovered_line(results["recovered"]))
    if results.get("coverage"):                 # train.source=real has no teacher pool
        print(coverage_line(results["coverage"]))
    print(f"\nrun directory: {results['run_dir']}  (wall {results['wall_s']:.0f}s)")
    for note in results.get("notes", []):
        print(f"note: {note}")
    return 0


def compare(args: argparse.Namespace, methods: list[str]) -> int:
    """Several methods on the same pool, one table (raydfml.compare)."""
    from raydfml.compare import run_comparison
    from raydfml.compare import comparison_table

    cfgs = [build_config(args, m) for m in methods]     # every config error surfaces before any work
    if args.print_config:
        import yaml

        print(yaml.safe_dump_all([c.to_dict() for c in cfgs], sort_keys=False), end="")
        return 0
    comparison = run_comparison(cfgs, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    print(comparison_table(comparison).to_string())
    print(f"\ncomparison directory: {comparison['out']}  (wall {comparison['wall_s']:.0f}s; one run directory "
          f"per method inside)")
    for note in comparison["notes"]:
        print(f"note: {note}")
    return 0


def several_seeds(args: argparse.Namespace, methods: list) -> int:
    """``--seeds``: the run or comparison once per seed, then mean ± std across seeds (raydfml.seeds)."""
    from pathlib import Path

    from raydfml.compare import run_comparison
    from raydfml.experiment import run_experiment
    from raydfml.runtime.driver import CHECKPOINT
    from raydfml.seeds import default_seeds_dir, parse_seeds, run_seeds, seeds_table

    seeds = parse_seeds(args.seeds)
    cfgs = {s: [build_config(args, m, seed=s) for m in methods] for s in seeds}     # every error up front
    ref = cfgs[seeds[0]][0]
    out = Path(args.out) if args.out else default_seeds_dir(ref.scenario, [c.method for c in cfgs[seeds[0]]],
                                                            ref.profile, seeds)

    def run_one(seed: int, seed_dir: Path, resume: bool) -> dict:
        if len(methods) > 1:
            return run_comparison(cfgs[seed], out_dir=seed_dir, resume=resume, progress=not args.quiet)
        cfg = cfgs[seed][0]
        cfg.out = str(seed_dir)
        return run_experiment(cfg, resume=resume and (seed_dir / CHECKPOINT).is_file(), progress=not args.quiet)

    result = run_seeds(seeds, run_one, out, resume=args.resume)
    import pandas as pd

    print(seeds_table(pd.DataFrame(result["table"])).to_string())
    print(f"\nmean ± std over seeds {', '.join(map(str, seeds))}; per-seed runs and tables in {result['out']}  "
          f"(wall {result['wall_s']:.0f}s)")
    return 0


def cli() -> None:
    from raydfml.errors import run_cli

    run_cli(main)
