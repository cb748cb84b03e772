"""benchmarks/gpu_check.py runs (smoke profile, in-process) and reports where a round's time goes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_gpu_check_reports_the_shares_of_a_round(smoke_root, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--profile", "smoke",
                           "--scenario", "mr", "--method", "deepinv", "--rounds", "2", "--workers", "0",
                           "--teachers", "4", "--data-root", str(smoke_root), "--out", str(tmp_path / "g")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "g" / "gpu_check.json").read_text())
    shares = out["share_actors"] + out["share_meta_learner"] + out["share_driver"]
    assert 0.99 <= shares <= 1.01 and out["share_actors"] > 0 and out["rounds_per_s"] > 0
    assert out["max_speedup_from_more_actors"] >= 1.0
