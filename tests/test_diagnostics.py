"""The yardstick (share of the with-data gain over random init a method recovers) and class coverage."""
from __future__ import annotations

import pytest

from raydfml.diagnostics import gain_recovered, recovered_line


def _recs(acc1, acc5):
    return [{"way": 5, "shot": 1, "accuracy": acc1, "ci95": 0.5, "tasks": 600},
            {"way": 5, "shot": 5, "accuracy": acc5, "ci95": 0.5, "tasks": 600}]


def test_gain_recovered_is_the_share_of_each_references_gain():
    baselines = {"random_init": _recs(20.0, 22.0), "with_data": _recs(60.0, 82.0), "with_data_pool": _recs(40.0, 52.0)}
    rec = gain_recovered(_recs(30.0, 37.0), baselines)
    assert rec["with_data"] == {"1": pytest.approx(0.25), "5": pytest.approx(0.25)}
    assert rec["with_data_pool"] == {"1": pytest.approx(0.5), "5": pytest.approx(0.5)}
    assert "25% / 25% of with_data's (1/5-shot)" in recovered_line(rec)


def test_references_without_a_gain_or_missing_are_left_out():
    baselines = {"random_init": _recs(20.0, 22.0), "with_data": _recs(19.0, 22.0)}
    assert gain_recovered(_recs(30.0, 37.0), baselines) == {}
    assert gain_recovered(_recs(30.0, 37.0), {"with_data": _recs(60.0, 82.0)}) == {}
