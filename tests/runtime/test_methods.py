"""FREE and TGR inside the engine: distributed aggregation equals the in-process computation,
warm-up and banking, TGR's group cache, resume, and the ma scenario's per-architecture counts."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from raydfml.config import resolve
from raydfml.runtime.driver import TaskGroups, _free_round, _mean_round, _shares, _tgr_round

TIDS = [0, 5, 10]          # one conv4, one resnet10, one resnet18 teacher of the ma smoke pool (4 each)


@pytest.fixture(scope="module")
def ma_pool(tmp_path_factory):
    """The ma smoke pool (conv4 + resnet10 + resnet18, 4 teachers each) on the smoke glyph set."""
    from raydfml.data.layout import ensure_dataset
    from raydfml.runtime.pool import prepare_pool

    root = tmp_path_factory.mktemp("ma-data")
    ensure_dataset(root, "glyphs-smoke")
    cfg = _cfg(root, "tgr", 0)
    entries = prepare_pool(cfg, workers=0, progress=False)
    return root, entries


def _cfg(root, method, workers, **over):
    overrides = {"data.data_root": str(root), "runtime.workers": workers, "runtime.device": "cpu", **over}
    return resolve("ma", method, "smoke", overrides)


def _executors(cfg_ray, cfg_local, entries):
    from raydfml.runtime.executor import InProcessExecutor, RayExecutor

    classes = sorted({c for e in entries for c in e.record.classes})
    return RayExecutor(cfg_ray, entries, classes), InProcessExecutor(cfg_local, entries, classes)


def _params(ex) -> np.ndarray:
    return np.asarray(ex.get(ex.call(ex.meta, "flat_params")))


def _last_grad(ex) -> np.ndarray:
    return np.asarray(ex.get(ex.call(ex.meta, "last_meta_grad")))


def _assert_same_update(a: np.ndarray, b: np.ndarray) -> None:
    """Equal to float tolerance. The gradients, not the parameters after Adam, are compared: Adam's
    first step is ~lr*sign(g), which turns float noise in near-zero coordinates into lr-sized steps."""
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(b).max())))


def test_ma_pool_has_three_architectures(ma_pool):
    _, entries = ma_pool
    assert [e.record.arch for e in entries] == ["conv4"] * 4 + ["resnet10"] * 4 + ["resnet18"] * 4
    assert all(e.record.width == 0.125 for e in entries[4:])


def test_tgr_update_from_two_actors_equals_the_in_process_igr(ma_pool, ray_session):
    """Two-phase first-order IGR across 2 TeacherPool actors == igr_first_order_local in one process."""
    from raydfml.aggregation.tgr import igr_first_order_local, task_losses

    root, entries = ma_pool
    cfg = _cfg(root, "tgr", 2)
    ray_ex, local = _executors(cfg, _cfg(root, "tgr", 0), entries)
    try:
        before = _params(ray_ex)
        assert np.array_equal(before, _params(local))               # same seeded initialisation
        metrics: dict = {}
        _tgr_round(cfg, ray_ex, ray_ex.meta, 0, _shares(TIDS, ray_ex.num_pools), metrics)
        assert ray_ex.num_pools == 2 and metrics["tgr/spread"] > 0

        pool, ml = local.pools[0], local.meta
        items = pool.recover(0, TIDS, None, "task", True)
        from raydfml.runtime.teacher_pool import task_from_numpy

        tasks = [task_from_numpy(it["task"], ml.device) for it in items]
        grads, _ = igr_first_order_local(task_losses(ml.learner, tasks), ml.params, cfg.aggregate.tgr_eta)
        ml._step(grads)
        g_ray, g_local = _last_grad(ray_ex), _last_grad(local)
        assert np.linalg.norm(g_local) > 0 and not np.allclose(_params(ray_ex), before)
        _assert_same_update(g_ray, g_local)
        assert metrics["kd/grad_norm"] == pytest.approx(float(np.linalg.norm(g_local)), rel=1e-4)
    finally:
        ray_ex.shutdown()


def test_mean_and_free_updates_from_two_actors_equal_in_process(ma_pool, ray_session):
    root, entries = ma_pool
    for method, round_fn, r in [("geninv", _mean_round, 0), ("free", _free_round, 3)]:
        cfg = _cfg(root, method, 2)
        ray_ex, local = _executors(cfg, _cfg(root, method, 0), entries)
        try:
            m_ray, m_local = {}, {}
            round_fn(cfg, ray_ex, ray_ex.meta, r, _shares(TIDS, 2), m_ray)
            round_fn(cfg, local, local.meta, r, _shares(TIDS, 1), m_local)
            _assert_same_update(_last_grad(ray_ex), _last_grad(local))
            if method == "free":     # the meta-generator's update too (one Adam step from the same state)
                np.testing.assert_allclose(ray_ex.get(ray_ex.call(ray_ex.meta, "generator_state")),
                                           local.meta.generator_state(), rtol=0, atol=2e-3 * 1e-3 + 1e-6)
        finally:
            ray_ex.shutdown()


def test_free_warmup_trains_only_the_generator_then_banks_every_teacher(ma_pool):
    from raydfml.runtime.executor import InProcessExecutor

    root, entries = ma_pool
    cfg = _cfg(root, "free", 0)
    ex = InProcessExecutor(cfg, entries, sorted({c for e in entries for c in e.record.classes}))
    theta0, gen0 = _params(ex), ex.meta.generator_state()
    m: dict = {}
    _free_round(cfg, ex, ex.meta, 0, [TIDS], m)                   # warm-up (smoke: 1 round)
    assert m["free/warmup"] == 1.0 and len(ex.meta.bank) == 0
    assert np.array_equal(_params(ex), theta0) and not np.allclose(ex.meta.generator_state(), gen0)
    m = {}
    items = _free_round(cfg, ex, ex.meta, 1, [TIDS], m)
    assert m["free/warmup"] == 0.0 and not np.allclose(_params(ex), theta0)
    assert len({it["teacher"] for it in items}) == len(TIDS)      # three different teachers (FREE's bug B2)
    per_teacher = cfg.synth.per_class * cfg.pool.way
    assert len(ex.meta.bank) == per_teacher * len(TIDS)           # every teacher's task (FREE's bug B1)
    assert {it["arch"] for it in items} == {"conv4", "resnet10", "resnet18"}


class _NoEmbedding:
    num_pools = 1

    def map_pool(self, *a):
        raise AssertionError("groups should have come from the cache")


def test_tgr_groups_cover_the_pool_and_are_cached(ma_pool, tmp_path):
    from raydfml.runtime.executor import InProcessExecutor

    root, entries = ma_pool
    cfg = _cfg(root, "tgr", 0)
    ex = InProcessExecutor(cfg, entries, sorted({c for e in entries for c in e.record.classes}))
    groups = TaskGroups(cfg, ex, entries, tmp_path).groups(0)
    assert sorted(i for g in groups for i in g) == list(range(len(entries)))     # all teachers (TGR's bug B3)
    assert len(groups) == cfg.aggregate.tgr_groups
    doc = json.loads((tmp_path / "tgr_groups.json").read_text())
    assert doc["groups"] == groups and len(doc["similarity"]) == len(entries)
    assert len(ex.meta.bank) > 0                                   # the embedding phase's data is banked
    cached = TaskGroups(cfg, _NoEmbedding(), entries, tmp_path)
    assert cached.groups(5) == groups
    tids = cached.round_teachers(3)
    assert set(tids) <= set(groups[cached.round_group(3)]) and len(set(tids)) == len(tids)


def test_free_resume_after_a_crash_matches_an_uninterrupted_run(ma_pool, tmp_path):
    """A run interrupted after round 1 and resumed ends with the same parameters as one that was not."""
    from raydfml.report import RunReport
    from raydfml.runtime.driver import train

    root, entries = ma_pool
    cfg = _cfg(root, "free", 0, **{"train.rounds": 3})

    def run(out, resume=False, crash_after=None):
        def hook(r, metrics, ex):
            if crash_after is not None and r == crash_after:
                raise KeyboardInterrupt
        report = RunReport(out, cfg.to_dict(), resume=resume)
        try:
            return train(cfg, out, report, resume=resume, progress=False, entries=entries, on_round_end=hook)
        finally:
            report.close()

    full = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_after=1)
    resumed = run(tmp_path / "b", resume=True)
    for n in full["best_params"]:
        assert torch.equal(full["best_params"][n], resumed["best_params"][n]), n
    metrics = pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert metrics["round"].tolist() == [0, 1, 2]
