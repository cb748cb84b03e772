"""Helpers for the method tests: configs on the ma smoke pool, executors, and one round of a method
with chosen teachers, through the same ``Round`` the driver gives a method."""
from __future__ import annotations

import numpy as np

from raydfml.config import resolve

TIDS = [0, 5, 10]          # one conv4, one resnet10, one resnet18 teacher of the ma smoke pool (4 each)


def method_cfg(root, method, workers, **over):
    overrides = {"data.data_root": str(root), "runtime.workers": workers, "runtime.device": "cpu", **over}
    return resolve("ma", method, "smoke", overrides)


def pool_classes(entries) -> list[int]:
    return sorted({c for e in entries for c in e.global_classes})


def executors(cfg_ray, cfg_local, entries):
    from raydfml.runtime.executor import InProcessExecutor, RayExecutor

    return RayExecutor(cfg_ray, entries, pool_classes(entries)), InProcessExecutor(cfg_local, entries, pool_classes(entries))


def one_round(cfg, ex, entries, r, run_dir, teachers=TIDS):
    """Round ``r`` of ``cfg.method`` on ``teachers``: (the round's metrics, the batch it returned)."""
    from raydfml.aggregation import build_rule
    from raydfml.methods import TeacherRecovery, create_method
    from raydfml.runtime.driver import Round

    method = create_method(cfg)
    rnd = Round(r, cfg, ex, entries, run_dir, build_rule(cfg))
    rnd.draw_teachers = lambda: list(teachers)
    if isinstance(method, TeacherRecovery):
        batch = method.recover_and_step(rnd, list(teachers))
    else:
        batch = method.run_round(rnd)
    return rnd.metrics, batch


def flat_params(ex) -> np.ndarray:
    return np.asarray(ex.get(ex.call(ex.meta, "flat_params")))


def last_grad(ex) -> np.ndarray:
    return np.asarray(ex.get(ex.call(ex.meta, "last_meta_grad")))


def assert_same_update(a: np.ndarray, b: np.ndarray) -> None:
    """Equal to float tolerance. The gradients, not the parameters after Adam, are compared: Adam's
    first step is ~lr*sign(g), which turns float noise in near-zero coordinates into lr-sized steps."""
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(b).max())))
