"""The final meta-test: the method and its baselines on one fixed, seeded set of tasks.

Baselines (DESIGN.md "Evaluation protocol"):
- ``random_init``: the meta-model at its seeded initialisation, fine-tuned with the same protocol;
- ``teacher_average``: PURER's FedAvg of the teachers' weights (only when every teacher has the
  meta-model's architecture and width);
- ``with_data``: the same learner meta-trained on *real* meta-train episodes for the same number of
  meta-updates: the upper bound data-free methods chase.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ExperimentConfig
from .data.episodes import EpisodeSampler
from .data.layout import load_split
from .data.transforms import normalize
from .runtime.parts import build_learner_for, build_meta_model, task_seed
from .utils import resolve_device


def random_init_params(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(task_seed(cfg.seed, 1))   # the MetaLearner's own initialisation
    return {n: p.detach().clone() for n, p in build_meta_model(cfg).named_parameters()}


def teacher_average_params(cfg: ExperimentConfig, entries) -> tuple[dict | None, str | None]:
    from .evaluation import teacher_average
    from .zoo import load_teacher_state

    lc = cfg.learner
    if any(e.record.arch != lc.arch or e.record.width != lc.width for e in entries) or lc.adaptive_pool:
        return None, "teacher_average skipped: teachers and meta-model differ in architecture"
    states = [load_teacher_state(e.zoo_dir, e.record) for e in entries]
    try:
        return teacher_average(states, build_meta_model(cfg)), None
    except ValueError as exc:
        return None, f"teacher_average skipped: {exc}"


def train_with_data(cfg: ExperimentConfig, meta_updates: int, device: torch.device, progress: bool = False):
    """Meta-train the same learner on real meta-train episodes for ``meta_updates`` outer steps."""
    lc, tr = cfg.learner, cfg.train
    split = load_split(Path(cfg.data.data_root).resolve(), cfg.data.dataset, "meta_train",
                       image_size=cfg.data.image_size)
    sampler = EpisodeSampler(split, way=tr.way, shot=lc.train_shot, query=lc.train_query, seed=task_seed(cfg.seed, 31))
    params = {n: p.to(device).requires_grad_(True) for n, p in random_init_params(cfg).items()}
    model = build_meta_model(cfg).to(device)
    learner = build_learner_for(cfg, model)
    opt = torch.optim.Adam(list(params.values()), lr=lc.outer_lr)
    from .learners import Task

    k = 0
    for _ in tqdm(range(meta_updates), desc="with-data baseline", unit="step", disable=not progress):
        total: dict[str, torch.Tensor] = {}
        for _ in range(lc.meta_batch):
            ep = sampler.episode(k)
            k += 1
            task = Task(normalize(ep.support, split.spec, device), ep.support_labels.to(device),
                        normalize(ep.query, split.spec, device), ep.query_labels.to(device))
            g, _ = learner.meta_grads(params, task)
            for n, v in g.items():
                total[n] = total.get(n, 0) + v.detach()
        opt.zero_grad(set_to_none=True)
        for n, p in params.items():
            if n in total:
                p.grad = total[n] / lc.meta_batch
        opt.step()
    return {n: p.detach().cpu() for n, p in params.items()}


def _with_data_task(cfg_dict: dict, meta_updates: int) -> dict:
    from .runtime.cluster import worker_device

    cfg = ExperimentConfig.from_dict(cfg_dict)
    return train_with_data(cfg, meta_updates, worker_device(cfg.runtime.device))


def _evaluate_one(cfg_dict: dict, params: dict, shot: int, device: str | None = None) -> dict:
    """One (model, shot) cell of the results table; a Ray task body when workers > 0."""
    from .evaluation import evaluate
    from .runtime.cluster import worker_device

    cfg = ExperimentConfig.from_dict(cfg_dict)
    dev = torch.device(device) if device else worker_device(cfg.runtime.device)
    split = load_split(Path(cfg.data.data_root).resolve(), cfg.data.dataset, "meta_test",
                       image_size=cfg.data.image_size)
    learner = build_learner_for(cfg, build_meta_model(cfg).to(dev))
    tr = cfg.train
    res = evaluate(learner, {n: v.to(dev) for n, v in params.items()}, split, way=tr.way, shot=shot,
                   query=tr.query, tasks=tr.test_tasks, seed=task_seed(cfg.seed, 4099), device=dev)
    return res.record()


def evaluate_final(cfg: ExperimentConfig, trained: dict, entries, progress: bool = True) -> dict:
    """Meta-test the method and every baseline on the same tasks; returns the results-dict fields."""
    t0 = time.time()
    device = resolve_device(cfg.runtime.device)
    notes: list[str] = []
    models: dict[str, dict] = {cfg.method: trained["best_params"]}
    if "random_init" in cfg.train.baselines:
        models["random_init"] = random_init_params(cfg)
    if "teacher_average" in cfg.train.baselines:
        avg, note = teacher_average_params(cfg, entries)
        if avg is not None:
            models["teacher_average"] = avg
        else:
            notes.append(note)
    t_wd = time.time()
    if "with_data" in cfg.train.baselines:
        if cfg.runtime.workers > 0:   # a one-thread Ray task, like every other worker of the run
            import ray

            task = ray.remote(_with_data_task).options(num_cpus=1, num_gpus=0)
            models["with_data"] = ray.get(task.remote(cfg.to_dict(), trained["meta_updates"]))
        else:
            models["with_data"] = train_with_data(cfg, trained["meta_updates"], device, progress)
    t_wd = time.time() - t_wd

    cells = [(name, shot) for name in models for shot in cfg.train.test_shots]
    cfg_dict = cfg.to_dict()
    if cfg.runtime.workers > 0:
        import ray

        task = ray.remote(_evaluate_one).options(num_cpus=1, num_gpus=0)
        refs = [task.remote(cfg_dict, {n: v.cpu() for n, v in models[name].items()}, shot) for name, shot in cells]
        records = []
        for ref in tqdm(refs, desc="meta-test", unit="cell", disable=not progress):
            records.append(ray.get(ref))
    else:
        records = [_evaluate_one(cfg_dict, models[name], shot, str(device))
                   for name, shot in tqdm(cells, desc="meta-test", unit="cell", disable=not progress)]
    by_model: dict[str, list[dict]] = {}
    for (name, _), rec in zip(cells, records):
        by_model.setdefault(name, []).append(rec)
    return {"meta_test": by_model.pop(cfg.method), "baselines": by_model, "notes": notes,
            "time/with_data_s": round(t_wd, 1), "time/meta_test_s": round(time.time() - t0 - t_wd, 1)}
