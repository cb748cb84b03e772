"""FREE in the engine: warm-up trains only the meta-generator, then every teacher's task is banked;
a run resumed after a crash ends where an uninterrupted one does."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from method_rounds import TIDS, flat_params, method_cfg, one_round, pool_classes


def test_free_warmup_trains_only_the_generator_then_banks_every_teacher(ma_pool, tmp_path):
    from raydfml.runtime.executor import InProcessExecutor

    root, entries = ma_pool
    cfg = method_cfg(root, "free", 0)
    ex = InProcessExecutor(cfg, entries, pool_classes(entries))
    theta0, gen0 = flat_params(ex), ex.meta.central("generator_state", 0)
    m, _ = one_round(cfg, ex, entries, 0, tmp_path)                # warm-up (smoke: 1 round)
    assert m["free/warmup"] == 1.0 and len(ex.meta.bank) == 0
    assert np.array_equal(flat_params(ex), theta0)
    assert not np.allclose(ex.meta.central("generator_state", 0), gen0)
    m, batch = one_round(cfg, ex, entries, 1, tmp_path)
    assert m["free/warmup"] == 0.0 and not np.allclose(flat_params(ex), theta0)
    assert batch.teachers == TIDS                                   # three different teachers (FREE's bug B2)
    per_teacher = cfg.synth.per_class * cfg.pool.way
    assert len(ex.meta.bank) == per_teacher * len(TIDS)            # every teacher's task (FREE's bug B1)
    assert {r.arch for r in batch.summaries} == {"conv4", "resnet10", "resnet18"}
    assert all(r.images is None and r.task is None for r in batch.summaries)   # the driver saw no arrays


def test_free_resume_after_a_crash_matches_an_uninterrupted_run(ma_pool, tmp_path):
    """A run interrupted after round 1 and resumed ends with the same parameters as one that was not."""
    from raydfml.report import RunReport
    from raydfml.runtime.driver import train

    root, entries = ma_pool
    cfg = method_cfg(root, "free", 0, **{"train.rounds": 3})

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


def test_resume_applies_this_runs_learning_rates(ma_pool, tmp_path):
    """A restored optimiser state keeps the config's learning rates (PBT restores other trials' states)."""
    from raydfml.runtime.meta_learner import MetaLearner

    root, entries = ma_pool
    a = MetaLearner(method_cfg(root, "free", 0).to_dict(), pool_classes(entries), device="cpu", load_val=False)
    state = a.state_dict()
    b_cfg = method_cfg(root, "free", 0, **{"learner.outer_lr": 0.05, "free.meta_lr": 0.02})
    b = MetaLearner(b_cfg.to_dict(), pool_classes(entries), device="cpu", load_val=False)
    b.load_state_dict(state)
    assert [g["lr"] for g in b.opt.param_groups] == [0.05]
    assert [g["lr"] for g in b.method.meta_gen.optimizer.param_groups] == [0.02]
