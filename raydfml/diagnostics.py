"""What a run's numbers mean: the share of the with-data gain a method recovers, and the pool's class
coverage, so that lost coverage and weak synthesis can be told apart.

The yardstick of every table: ``recovered = (method - random_init) / (with_data - random_init)`` per
setting, with-data trained in the same run for the same number of meta-updates. Against
``with_data_pool`` (real episodes of only the classes the pool covers) it isolates what synthesis and
distillation lose; ``with_data_pool`` against ``with_data`` is what the pool's coverage costs.
"""
from __future__ import annotations

from typing import Mapping, Sequence

REFERENCES = ("with_data", "with_data_pool")


def class_coverage(cfg, entries) -> dict[str, dict[str, int]]:
    """Per dataset of the pool: meta-train classes it has, and how many of them some teacher knows."""
    from pathlib import Path

    from .data.layout import dataset_dir, read_split_csv, split_csv_path
    from .runtime.pool import pool_datasets

    root = Path(cfg.data.data_root).resolve()
    out = {}
    for d in pool_datasets(cfg):
        ddir = dataset_dir(root, d)
        _, labels, _ = read_split_csv(split_csv_path(ddir, "meta_train"), ddir)
        covered = {int(c) for e in entries if e.dataset == d for c in e.record.classes}
        out[d] = {"covered": len(covered), "classes": len(set(labels))}
    return out


def coverage_line(coverage: Mapping[str, Mapping[str, int]]) -> str:
    parts = [f"{d}: {c['covered']} of {c['classes']} meta-train classes ({100 * c['covered'] / c['classes']:.0f}%)"
             for d, c in coverage.items() if c["classes"]]
    return "pool coverage: " + "; ".join(parts)


def _by_shot(records: Sequence[Mapping] | None) -> dict[int, float]:
    return {int(r["shot"]): float(r["accuracy"]) for r in records or []}


def gain_recovered(method: Sequence[Mapping], baselines: Mapping[str, Sequence[Mapping]]) -> dict[str, dict[str, float]]:
    """``{reference: {shot: share}}``: the method's gain over ``random_init`` as a share of each
    reference's (``with_data``, ``with_data_pool``); references without a positive gain are left out.
    Shots are string keys (``"1"``), as they read back from results.json."""
    mine, rand = _by_shot(method), _by_shot(baselines.get("random_init"))
    out: dict[str, dict[int, float]] = {}
    for ref in REFERENCES:
        upper = _by_shot(baselines.get(ref))
        shares = {str(s): (mine[s] - rand[s]) / (upper[s] - rand[s]) for s in mine
                  if s in rand and s in upper and upper[s] - rand[s] > 0}
        if shares:
            out[ref] = shares
    return out


def recovered_line(recovered: Mapping[str, Mapping[str, float]]) -> str:
    """One line: ``gain recovered: 31% / 30% of with_data's (1-/5-shot), 45% / 44% of with_data_pool's``."""
    parts = []
    for ref, shares in recovered.items():
        shares = {int(s): v for s, v in shares.items()}
        shots = sorted(shares)
        parts.append(" / ".join(f"{100 * shares[s]:.0f}%" for s in shots) + f" of {ref}'s ("
                     + "/".join(str(s) for s in shots) + "-shot)")
    return "gain over random_init recovered: " + ", ".join(parts) if parts else ""


__all__ = ["REFERENCES", "class_coverage", "coverage_line", "gain_recovered", "recovered_line"]


def provenance(cfg, entries) -> dict:
    """What produced a run: package version, git commit (when the package is in a git checkout; "+dirty"
    with uncommitted changes), dataset(s), backbones, learner and each zoo manifest's sha256."""
    import subprocess
    from pathlib import Path

    from . import __version__
    from .utils import sha256_file

    repo = Path(__file__).resolve().parents[1]
    commit = None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            commit = head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    zoos = sorted({e.zoo_dir for e in entries})
    return {"version": __version__, "git_commit": commit,
            "dataset": list(cfg.data.domains) or [cfg.data.dataset],
            "backbones": {"teachers": list(cfg.pool.archs), "meta_model": cfg.learner.arch},
            "learner": cfg.learner.name,
            "zoos": {z: (sha256_file(Path(z) / "manifest.csv") if (Path(z) / "manifest.csv").is_file() else None)
                     for z in zoos}}
