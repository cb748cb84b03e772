"""benchmarks/blackbox_queries.py runs on the smoke zoo and reports what the recovery costs, per q."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_blackbox_benchmark_reports_queries_and_cosines_per_q(smoke_root, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "blackbox_queries.py"
    spec = importlib.util.spec_from_file_location("blackbox_queries", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--smoke", "--data-root", str(smoke_root), "--qs", "1,32", "--steps", "2",
                       "--teachers", "1", "--per-class", "2"])
    n = 5 * 2                                              # way x per_class
    assert [r["images_per_task"] for r in rows] == [2 * n * (1 + q) + n for q in (1, 32)]
    assert rows[1]["cosine"] > rows[0]["cosine"] and rows[1]["cosine"] > 0.03   # more directions, closer
    assert "cosine" in capsys.readouterr().out
