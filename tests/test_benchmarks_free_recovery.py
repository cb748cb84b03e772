"""benchmarks/free_recovery.py's core on a tiny real pool: both starts measured, held-out teachers unseen."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "free_recovery.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("free_recovery_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pool(glyph_root):
    from raydfml.config import resolve
    from raydfml.runtime.pool import prepare_pool

    # smoke profile: 4 conv4 teachers, 1 epoch each, trained in-process on the 10 meta-train classes
    cfg = resolve("mr", "deepinv", "smoke", {"data.dataset": "glyphs", "data.data_root": str(glyph_root),
                                             "runtime.device": "cpu"})
    return prepare_pool(cfg, workers=0, progress=False)


def test_meta_and_scratch_recoveries_are_measured_on_unseen_teachers(bench, pool):
    from raydfml.data.registry import get_spec

    spec = get_spec("glyphs")
    s = bench.BenchSettings(ngf=8, per_class=2, warmup=3, teachers_per_round=2, adapt_steps=2, heldout=1,
                            repeats=2, max_steps=6)
    res = bench.run_benchmark(pool, spec.mean, spec.std, 32, s)

    assert res.heldout_teachers == [pool[-1].index] and pool[-1].index not in res.warmup_teachers
    assert len(res.warmup_draws) == 3 and all(len(set(d)) == 2 for d in res.warmup_draws)
    assert all(t in res.warmup_teachers for d in res.warmup_draws for t in d)      # never a held-out one
    assert res.meta_updates == 3 and res.warmup_passes == 3 * 2 * 2 and res.warmup_seconds > 0
    assert [p.seed for p in res.pairs] == [10_000, 10_001]
    for p in res.pairs:
        for r, target in ((p.meta, s.target_acc), (p.scratch, s.target_acc),
                          (p.scratch_to_meta_short, p.meta_short.acc)):
            assert 0 <= r.passes <= s.max_steps and math.isfinite(r.seconds) and 0.0 <= r.acc <= 1.0
            assert r.acc >= target or r.passes == s.max_steps                  # stopped only at target or budget
        assert p.meta_short.passes == p.scratch_short.passes == s.adapt_steps  # the FREE-style fixed budget
    lines = bench.report(res, s)
    assert any(line.startswith("passes   median") for line in lines) and any("B18" in line for line in lines)
