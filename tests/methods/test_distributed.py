"""A round on 2 TeacherPool actors gives the same meta-update as the same round in one process, for
each aggregation rule: mean (geninv), align (free) and the two-pass igr (tgr)."""
from __future__ import annotations

import numpy as np
import pytest
from method_rounds import (TIDS, assert_same_update, executors, flat_params, last_grad, method_cfg,
                           one_round)

pytestmark = pytest.mark.ray


def test_tgr_update_from_two_actors_equals_the_in_process_igr(ma_pool, ray_session, tmp_path):
    """Two-pass first-order IGR across 2 TeacherPool actors == igr_first_order_local in one process."""
    from raydfml.aggregation.tgr import igr_first_order_local, task_losses

    root, entries = ma_pool
    cfg = method_cfg(root, "tgr", 2)
    ray_ex, local = executors(cfg, method_cfg(root, "tgr", 0), entries)
    try:
        before = flat_params(ray_ex)
        assert np.array_equal(before, flat_params(local))               # same seeded initialisation
        metrics, _ = one_round(cfg, ray_ex, entries, 0, tmp_path)
        assert ray_ex.num_pools == 2 and metrics["igr/spread"] > 0

        pool, ml = local.pools[0], local.meta
        _, records = pool.work("recover", 0, TIDS, None, None, "task")
        tasks = [r.task.to_task(ml.device) for r in records]
        grads, _ = igr_first_order_local(task_losses(ml.learner, tasks), ml.params, cfg.section("igr").eta)
        ml._step(grads)
        g_ray, g_local = last_grad(ray_ex), last_grad(local)
        assert np.linalg.norm(g_local) > 0 and not np.allclose(flat_params(ray_ex), before)
        assert_same_update(g_ray, g_local)
        assert metrics["kd/grad_norm"] == pytest.approx(float(np.linalg.norm(g_local)), rel=1e-4)
    finally:
        ray_ex.shutdown()


@pytest.mark.parametrize("method,r", [("geninv", 0), ("free", 3)])
def test_mean_and_align_updates_from_two_actors_equal_in_process(ma_pool, ray_session, tmp_path, method, r):
    root, entries = ma_pool
    cfg = method_cfg(root, method, 2)
    ray_ex, local = executors(cfg, method_cfg(root, method, 0), entries)
    try:
        one_round(cfg, ray_ex, entries, r, tmp_path / "ray")
        one_round(method_cfg(root, method, 0), local, entries, r, tmp_path / "local")
        assert np.linalg.norm(last_grad(local)) > 0
        assert_same_update(last_grad(ray_ex), last_grad(local))
        if method == "free":     # the meta-generator's update too (one Adam step from the same state)
            state = ray_ex.get(ray_ex.call(ray_ex.meta, "central", "generator_state", 0))
            np.testing.assert_allclose(state, local.meta.central("generator_state", 0), rtol=0,
                                       atol=2e-3 * 1e-3 + 1e-6)
    finally:
        ray_ex.shutdown()
