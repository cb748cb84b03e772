"""Would another test-time rule for ProtoNet's features move the yardstick? Measured on finished runs.

    python benchmarks/test_time_features.py RUN_DIR [RUN_DIR ...] [--tasks 300]
        [--rules plain,l2,centred_l2,joint_bn]

For each finished ProtoNet run directory (``model.pt``, ``config.json``, ``results.json``) this retrains
the run's with-data reference (same config, seed and number of meta-updates: the run's own reference,
to the digit when ``--tasks`` equals the run's ``train.test_tasks``), and scores the method's model,
with-data and random init under each rule on the same meta-test tasks, with the share of the with-data
gain over random init that the method recovers. Nothing is retrained under a rule: a rule that helped
would then have to be trained with, so this only says whether that is worth trying. Rules:

- ``plain``: the engine's rule (support and query embedded separately, squared Euclidean distance to the
  support prototypes);
- ``l2``: features L2-normalised before the prototypes (cosine geometry);
- ``centred_l2``: the task's mean feature (support and query) subtracted, then L2 (SimpleShot's CL2N,
  with the task's mean standing in for the base classes' mean);
- ``joint_bn``: support and query through BatchNorm as one batch at test time only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RULES = ("plain", "l2", "centred_l2", "joint_bn")


class RuleOfPrediction:
    """A ProtoNet ``learner`` whose ``predict`` applies ``rule`` to the features (see the module doc)."""

    def __init__(self, learner, rule: str):
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}: choose from {', '.join(RULES)}")
        self.learner, self.rule = learner, rule

    def predict(self, params, x_support, y_support, x_query, steps=None):
        from raydfml.learners.protonet import proto_logits, prototypes

        f = self.learner.features
        with torch.no_grad():
            p = {n: v.detach() for n, v in params.items()}
            if self.rule == "joint_bn":
                both = f(p, torch.cat([x_support, x_query]))
                fs, fq = both[:len(x_support)], both[len(x_support):]
            else:
                fs, fq = f(p, x_support), f(p, x_query)
            if self.rule == "centred_l2":
                mean = torch.cat([fs, fq]).mean(0, keepdim=True)
                fs, fq = fs - mean, fq - mean
            if self.rule in ("l2", "centred_l2"):
                fs, fq = F.normalize(fs, dim=1), F.normalize(fq, dim=1)
            return proto_logits(fq, prototypes(fs, y_support))


def score(run_dir: Path, rules=RULES, tasks: int | None = None) -> list[dict]:
    """One row per rule: accuracies (method, with_data, random_init at each test shot) and recovered."""
    from raydfml.baselines import random_init_params, train_with_data
    from raydfml.config import ExperimentConfig
    from raydfml.evaluation import evaluate
    from raydfml.runtime.parts import build_learner_for, build_meta_model, meta_split
    from raydfml.utils import task_seed

    cfg = ExperimentConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    if cfg.learner.name != "protonet":
        raise SystemExit(f"error: {run_dir}: learner {cfg.learner.name!r}; these rules are ProtoNet's")
    results = json.loads((run_dir / "results.json").read_text())
    device = torch.device("cpu")
    models = {"method": torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True),
              "with_data": train_with_data(cfg, int(results["meta_updates"]), device),
              "random_init": random_init_params(cfg)}
    split = meta_split(cfg, cfg.data.dataset, "meta_test")
    learner = build_learner_for(cfg, build_meta_model(cfg))
    tasks = tasks or cfg.train.test_tasks
    rows = []
    for rule in rules:
        row = {"run": str(run_dir), "rule": rule}
        for name, params in models.items():
            for shot in cfg.train.test_shots:
                r = evaluate(RuleOfPrediction(learner, rule), params, split, way=cfg.train.way, shot=shot,
                             query=cfg.train.query, tasks=tasks, seed=task_seed(cfg.seed, 4099),
                             keep_per_task=False)
                row[f"{name}@{shot}"] = r.accuracy
        for shot in cfg.train.test_shots:
            gain = row[f"with_data@{shot}"] - row[f"random_init@{shot}"]
            row[f"recovered@{shot}"] = (row[f"method@{shot}"] - row[f"random_init@{shot}"]) / gain if gain else None
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    shots = sorted({int(k.split("@")[1]) for r in rows for k in r if k.startswith("method@")})
    head = ["run", "rule"] + [f"{n} {s}-shot" for n in ("method", "with_data", "random_init") for s in shots] + \
        [f"recovered {s}-shot" for s in shots]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [Path(r["run"]).name, r["rule"]]
        cells += [f"{r[f'{n}@{s}']:.1f}" for n in ("method", "with_data", "random_init") for s in shots]
        cells += ["-" if r[f"recovered@{s}"] is None else f"{100 * r[f'recovered@{s}']:.0f}%" for s in shots]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished ProtoNet run directories")
    p.add_argument("--tasks", type=int, default=None, help="meta-test tasks per cell (default: the run's)")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, from {', '.join(RULES)}")
    a = p.parse_args(argv)
    rules = [r for r in a.rules.split(",") if r]
    for r in rules:
        if r not in RULES:
            p.error(f"--rules: unknown rule {r!r} (choose from {', '.join(RULES)})")
    for d in a.runs:
        if not all((d / f).is_file() for f in ("model.pt", "config.json", "results.json")):
            p.error(f"{d}: not a finished run directory (needs model.pt, config.json and results.json)")
    torch.set_num_threads(1)
    rows = [row for d in a.runs for row in score(d, rules, a.tasks)]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
