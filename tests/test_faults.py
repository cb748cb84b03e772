"""Fault injection: a run SIGKILLed at each point resumes to the results of an uninterrupted run.

CI runs every point for deepinv and one point for each other method; `benchmarks/fault_matrix.py`
runs the whole matrix (every method x every point)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from raydfml.faults import POINTS

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fault_matrix", REPO / "benchmarks" / "fault_matrix.py")
fault_matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_matrix)

CASES = [("deepinv", p) for p in POINTS] + [("free", "mid_checkpoint"), ("tgr", "after_synthesis"),
                                            ("purer", "after_meta_step"), ("geninv", "mid_meta_test")]
_references: dict[str, dict] = {}


def _reference(method: str, root: Path, tmp_root: Path) -> dict:
    if method not in _references:
        out = tmp_root / f"{method}-uninterrupted"
        proc = fault_matrix.launch(method, root, out)
        assert proc.returncode == 0, proc.stderr[-2000:]
        _references[method] = json.loads((out / "results.json").read_text())
    return _references[method]


@pytest.mark.e2e
@pytest.mark.parametrize("method,point", CASES)
def test_killed_at_a_point_then_resumed_equals_an_uninterrupted_run(method, point, smoke_root, tmp_path_factory):
    tmp_root = tmp_path_factory.getbasetemp() / "faults"
    reference = _reference(method, smoke_root, tmp_root)
    cell = fault_matrix.kill_and_resume(method, point, smoke_root, tmp_root / f"{method}-{point}", reference)
    assert cell["killed_status"] == -9, cell                   # it died where the fault was injected
    assert cell["survived"] and cell["results_equal"], cell
