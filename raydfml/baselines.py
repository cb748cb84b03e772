"""The final meta-test: the method and its baselines on one fixed, seeded set of tasks.

Baselines (DESIGN.md "Evaluation protocol"):
- ``random_init``: the meta-model at its seeded initialisation, fine-tuned with the same protocol;
- ``teacher_average``: PURER's FedAvg of the teachers' weights (only when every teacher has the
  meta-model's architecture and width);
- ``with_data``: the same learner meta-trained on *real* meta-train episodes for the same number of
  meta-updates: the upper bound data-free methods chase;
- ``with_data_pool``: the same, on real episodes of only the meta-train classes the pool's teachers
  cover: the bound for *this* pool. The gap between the two is what the pool's class coverage costs;
  the gap between ``with_data_pool`` and the method is what synthesis and distillation lose.

Scenario md (``data.domains``): every model x shot cell is meta-tested on each domain's meta_test
split, on the same seeded tasks per domain for every model (``meta_test_domains``); ``meta_test`` and
``baselines`` then hold the mean over domains (:func:`mean_over_domains`). The with-data baseline
meta-trains on episodes drawn round-robin from every domain's meta_train split.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ExperimentConfig
from .data.transforms import normalize
from .runtime.parts import build_learner_for, build_meta_model, meta_split
from .runtime.pool import pool_datasets
from .runtime.real import RealEpisodes
from .utils import resolve_device, task_seed


def random_init_params(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(task_seed(cfg.seed, 1))   # the MetaLearner's own initialisation
    return {n: p.detach().clone() for n, p in build_meta_model(cfg).named_parameters()}


def teacher_average_params(cfg: ExperimentConfig, entries) -> tuple[dict | None, str | None]:
    from .evaluation import teacher_average
    from .zoo import load_teacher_state

    lc = cfg.learner
    if cfg.pool.black_box:
        return None, "teacher_average skipped: the teachers are black-box APIs (their weights are not available)"
    if any(e.record.arch != lc.arch or e.record.width != lc.width for e in entries) or lc.adaptive_pool:
        return None, "teacher_average skipped: teachers and meta-model differ in architecture"
    states = [load_teacher_state(e.zoo_dir, e.record) for e in entries]
    try:
        return teacher_average(states, build_meta_model(cfg)), None
    except ValueError as exc:
        return None, f"teacher_average skipped: {exc}"


TRAINED_BASELINES = ("with_data", "with_data_pool")      # meta-trained for the method's number of updates


def pool_classes(cfg: ExperimentConfig, entries) -> dict[str, list[int]]:
    """Per dataset of the pool, the meta-train class ids (of that dataset) its teachers cover."""
    return {d: sorted({int(c) for e in entries if e.dataset == d for c in e.record.classes})
            for d in pool_datasets(cfg)}


def with_data_episodes(cfg: ExperimentConfig, classes: dict[str, list[int]] | None = None):
    """Endless real meta-train episodes for the with-data baseline, as ``(dataset, spec, episode)``
    (:class:`raydfml.runtime.real.RealEpisodes`: seeded; md round-robin over the domains).
    ``classes`` (``with_data_pool``) restricts each dataset to those class ids; a dataset with fewer
    than ``train.way`` of them is left out."""
    source = RealEpisodes(cfg, classes)
    while True:
        d, ep = source.next()
        yield source.datasets[d], source.splits[d].spec, ep


def train_with_data(cfg: ExperimentConfig, meta_updates: int, device: torch.device, progress: bool = False,
                    classes: dict[str, list[int]] | None = None):
    """Meta-train the same learner on real meta-train episodes for ``meta_updates`` outer steps
    (md: episodes of every domain; ``classes``: only those classes, see :func:`with_data_episodes`)."""
    lc = cfg.learner
    episodes = with_data_episodes(cfg, classes)
    params = {n: p.to(device).requires_grad_(True) for n, p in random_init_params(cfg).items()}
    model = build_meta_model(cfg).to(device)
    learner = build_learner_for(cfg, model)
    opt = torch.optim.Adam(list(params.values()), lr=lc.outer_lr)
    from .learners import Task

    for _ in tqdm(range(meta_updates), desc="with-data baseline", unit="step", disable=not progress):
        total: dict[str, torch.Tensor] = {}
        for _ in range(lc.meta_batch):
            _, spec, ep = next(episodes)
            task = Task(normalize(ep.support, spec, device), ep.support_labels.to(device),
                        normalize(ep.query, spec, device), ep.query_labels.to(device))
            g, _ = learner.meta_grads(params, task)
            for n, v in g.items():
                total[n] = total.get(n, 0) + v.detach()
        opt.zero_grad(set_to_none=True)
        for n, p in params.items():
            if n in total:
                p.grad = total[n] / lc.meta_batch
        opt.step()
    return {n: p.detach().cpu() for n, p in params.items()}


def _with_data_task(cfg_dict: dict, meta_updates: int, classes: dict | None = None) -> dict:
    from .cluster import worker_device

    cfg = ExperimentConfig.from_dict(cfg_dict)
    return train_with_data(cfg, meta_updates, worker_device(cfg.runtime.device), classes=classes)


def _evaluate_one(cfg_dict: dict, params: dict, shot: int, device: str | None = None,
                  dataset: str | None = None) -> dict:
    """One (model, shot) cell of the results table on ``dataset``'s meta_test (default ``data.dataset``;
    md: one call per domain, same task seed); a Ray task body when workers > 0."""
    from .evaluation import evaluate
    from .cluster import worker_device

    cfg = ExperimentConfig.from_dict(cfg_dict)
    dev = torch.device(device) if device else worker_device(cfg.runtime.device)
    split = meta_split(cfg, dataset or cfg.data.dataset, "meta_test")
    learner = build_learner_for(cfg, build_meta_model(cfg).to(dev))
    tr = cfg.train
    res = evaluate(learner, {n: v.to(dev) for n, v in params.items()}, split, way=tr.way, shot=shot,
                   query=tr.query, tasks=tr.test_tasks, seed=task_seed(cfg.seed, 4099), device=dev)
    return res.record()


def mean_over_domains(records: list[dict]) -> dict:
    """md's headline record of one model x setting from its per-domain records: ``accuracy`` the mean
    of the domain accuracies, ``ci95 = sqrt(sum_d ci95_d^2) / D`` (the 95% half-width of a mean of D
    independent estimates: each domain has its own task set), ``tasks`` the per-domain task count."""
    if not records:
        raise ValueError("no per-domain records to average")
    first = records[0]
    for r in records[1:]:
        if (r["way"], r["shot"], r["tasks"]) != (first["way"], first["shot"], first["tasks"]):
            raise ValueError(f"per-domain records differ in setting: {first} vs {r}")
    d = len(records)
    return {"way": int(first["way"]), "shot": int(first["shot"]), "tasks": int(first["tasks"]),
            "accuracy": float(np.mean([r["accuracy"] for r in records])),
            "ci95": float(np.sqrt(sum(float(r["ci95"]) ** 2 for r in records)) / d)}


def evaluate_final(cfg: ExperimentConfig, trained: dict | None, entries, progress: bool = True,
                   baselines=None, with_data_updates: int | None = None) -> dict:
    """Meta-test the method and every baseline on the same tasks; returns the results-dict fields.

    ``baselines`` narrows ``cfg.train.baselines`` (``()``: the method alone) and ``trained=None``
    evaluates baselines only (``meta_test`` is then empty): a comparison of several methods on one
    pool evaluates the method-independent baselines once. ``with_data_updates`` sets the with-data
    baseline's meta-updates (default: the method's, ``trained["meta_updates"]``).
    """
    t0 = time.time()
    device = resolve_device(cfg.runtime.device)
    wanted = tuple(cfg.train.baselines if baselines is None else [b for b in cfg.train.baselines if b in baselines])
    if not entries:                 # train.source=real: no teacher pool to average or to restrict to
        wanted = tuple(b for b in wanted if b not in ("teacher_average", "with_data_pool"))
    if with_data_updates is None and set(TRAINED_BASELINES) & set(wanted):
        with_data_updates = trained["meta_updates"]
    notes: list[str] = []
    models: dict[str, dict] = {cfg.label: trained["best_params"]} if trained is not None else {}
    if "random_init" in wanted:
        models["random_init"] = random_init_params(cfg)
    if "teacher_average" in wanted:
        avg, note = teacher_average_params(cfg, entries)
        if avg is not None:
            models["teacher_average"] = avg
        else:
            notes.append(note)
    t_wd = time.time()
    trained_refs = {}
    for name in TRAINED_BASELINES:
        if name not in wanted:
            continue
        classes = pool_classes(cfg, entries) if name == "with_data_pool" else None
        if classes is not None and not any(len(c) >= cfg.episode_way for c in classes.values()):
            notes.append(f"with_data_pool skipped: the pool covers fewer than {cfg.episode_way} classes of any dataset")
            continue
        if cfg.runtime.workers > 0:   # one-thread Ray tasks (in parallel), like every other worker of the run
            import ray

            task = ray.remote(_with_data_task).options(num_cpus=1, num_gpus=0)
            trained_refs[name] = task.remote(cfg.for_workers(), with_data_updates, classes)
        else:
            models[name] = train_with_data(cfg, with_data_updates, device, progress, classes=classes)
    if trained_refs:
        import ray

        models.update(zip(trained_refs, ray.get(list(trained_refs.values()))))
    t_wd = time.time() - t_wd

    datasets = pool_datasets(cfg)       # md: every domain's meta_test; else data.dataset alone
    cells = [(name, shot, ds) for name in models for shot in cfg.train.test_shots for ds in datasets]
    cfg_dict = cfg.for_workers()
    if cfg.runtime.workers > 0:
        import ray

        task = ray.remote(_evaluate_one).options(num_cpus=1, num_gpus=0)
        refs = [task.remote(cfg_dict, {n: v.cpu() for n, v in models[name].items()}, shot, None, ds)
                for name, shot, ds in cells]
        records = []
        for ref in tqdm(refs, desc="meta-test", unit="cell", disable=not progress):
            records.append(ray.get(ref))
    else:
        records = [_evaluate_one(cfg_dict, models[name], shot, str(device), ds)
                   for name, shot, ds in tqdm(cells, desc="meta-test", unit="cell", disable=not progress)]
    by_domain: dict[str, dict[str, list[dict]]] = {ds: {} for ds in datasets}
    for (name, _, ds), rec in zip(cells, records):
        by_domain[ds].setdefault(name, []).append(rec)
    if cfg.data.domains:
        by_model = {name: [mean_over_domains([by_domain[ds][name][i] for ds in datasets])
                           for i in range(len(cfg.train.test_shots))] for name in models}
    else:
        by_model = dict(by_domain[datasets[0]])
    out = {"meta_test": by_model.pop(cfg.label, []), "baselines": by_model, "notes": notes,
           "time/with_data_s": round(t_wd, 1), "time/meta_test_s": round(time.time() - t0 - t_wd, 1)}
    if cfg.data.domains:
        out["meta_test_domains"] = by_domain
    return out
