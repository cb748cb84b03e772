"""The Tune trainable: one trial runs the engine's own experiment loop
(:func:`raydfml.experiment.run_method`) with a reporter that sends every round's metrics and
checkpoint to Tune, and the final meta-test with the last report."""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .search import placement_group
from .sweep import DIMENSIONS, Sweep, _resolve_point


def _tune_key(key: str) -> str:
    return key.replace("/", "_")


def _trial_config(config: dict[str, Any], base: dict[str, Any]):
    sweep = Sweep.from_dict(base["sweep"])
    point = {k: v for k, v in config.items() if k in DIMENSIONS or "." in k}
    cfg = _resolve_point(sweep, point, base["fixed"])
    sh = base["shares"]
    cfg.runtime.workers = int(sh["workers"])
    cfg.runtime.actor_cpus = float(sh["actor_cpus"])
    cfg.runtime.actor_gpus = float(sh["gpu_share"])
    cfg.runtime.address = None          # the trial is already inside the sweep's Ray cluster
    cfg.runtime.pool_strategy = "default"   # an explicit strategy would leave the trial's placement group
    return cfg


def _placement_group_of(_actor=None) -> str | None:
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    return pg.id.hex() if pg is not None else None


def _actors_in_trial_group(executor) -> float:
    """Fraction of the executor's actors that run inside this trial's placement group (1.0 expected)."""
    import ray

    actors = [executor.meta, *executor.pools]
    if not hasattr(executor, "ray"):         # in-process executor: nothing to place
        return float("nan")
    mine = _placement_group_of()
    theirs = ray.get([a.__ray_call__.remote(_placement_group_of) for a in actors])
    return sum(t is not None and t == mine for t in theirs) / len(theirs)


def _evaluate_in_trial(cfg, trained, entries, progress=False) -> dict:
    """The final meta-test inside the trial's process: Ray tasks would not fit the trial's bundles."""
    from ..baselines import evaluate_final

    eval_cfg = copy.deepcopy(cfg)
    eval_cfg.runtime.workers = 0
    return evaluate_final(eval_cfg, trained, entries, progress=False)


def run_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial: the experiment loop of ``launch.py`` with a Tune report (and checkpoint) per round.

    A restored trial (Tune's restore, or PBT exploiting another trial) resumes from the checkpoint it
    is given; the MetaLearner then applies this trial's learning rates to the restored optimisers.
    """
    import torch
    from ray import tune

    from ..experiment import run_method
    from ..runtime.driver import CHECKPOINT
    from ..runtime.pool import existing_pool
    from ..utils import seed_everything

    from ..plugins import install

    torch.set_num_threads(max(1, int(base["shares"]["trial_cpus"])))
    install(base.get("parts"))            # the user's own methods/rules, as the sweep's driver registered them
    cfg = _trial_config(config, base)
    ctx = tune.get_context()
    run_dir = Path(base["experiment_path"]) / f"trial_{ctx.get_trial_id()}" / "run"
    cfg.out = str(run_dir)
    seed_everything(cfg.seed)
    entries = existing_pool(cfg)          # built by the sweep's driver before any trial started
    state = {"last_val": float("nan"), "best_val": float("nan")}
    resume = False
    ck = tune.get_checkpoint()
    if ck is not None:
        with ck.as_directory() as d:
            (run_dir / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(d) / "last.pt", run_dir / CHECKPOINT)
            saved = json.loads((Path(d) / "trial_state.json").read_text())
            state.update({k: saved[k] for k in ("last_val", "best_val") if k in saved})
        resume = True
    pending: dict[str, Any] = {}

    def tune_metrics(r: int, metrics: dict) -> dict[str, Any]:
        if "val/acc" in metrics:
            state["last_val"] = float(metrics["val/acc"])
        if "val/best" in metrics:
            state["best_val"] = float(metrics["val/best"])
        out = {_tune_key(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        out.update(round=r, rounds_done=r + 1, rounds=cfg.train.rounds, val_acc=state["last_val"],
                   best_val_acc=state["best_val"], final=False)
        return out

    def checkpoint_dir(r: int) -> str:
        d = tempfile.mkdtemp(prefix="raydfml-ck-")
        shutil.copyfile(run_dir / CHECKPOINT, Path(d) / "last.pt")
        (Path(d) / "trial_state.json").write_text(json.dumps({**state, "round": r}))
        return d

    def reporter(r: int, metrics: dict, executor) -> None:
        out = tune_metrics(r, metrics)
        if "in_pg" not in state:
            state["in_pg"] = _actors_in_trial_group(executor)
        out["actors_in_trial_pg"] = state["in_pg"]
        if r == cfg.train.rounds - 1:        # reported together with the final meta-test below
            pending.update(out, _ck=checkpoint_dir(r))
            return
        d = checkpoint_dir(r)
        try:
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    results = run_method(cfg, run_dir, entries, resume=resume, progress=False, evaluate=_evaluate_in_trial,
                         t_start=time.time(), reporter=reporter)
    final = {k: v for k, v in pending.items() if k != "_ck"}
    for rec in results["meta_test"]:
        final[f"test_acc_{rec['shot']}shot"] = float(rec["accuracy"])
        final[f"test_ci95_{rec['shot']}shot"] = float(rec["ci95"])
    for name, recs in (results.get("baselines") or {}).items():
        for rec in recs or []:
            final[f"baseline_{name}_{rec['shot']}shot"] = float(rec["accuracy"])
    final.update(final=True, best_round=int(results["best_round"]), meta_updates=int(results["meta_updates"]))
    d = pending["_ck"]
    try:
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_trainable(base: dict[str, Any]):
    """The function trainable (a closure over the sweep) with its placement group attached."""
    from ray import tune

    def raydfml_trial(config):
        return run_trial(config, base)

    return tune.with_resources(raydfml_trial, placement_group(base["shares"]))
