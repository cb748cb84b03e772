"""Fixtures of the black-box tests: one tiny trained teacher per session (helpers in bb_teachers.py)."""
from __future__ import annotations

import copy

import pytest

from bb_teachers import train_square_teacher


@pytest.fixture(scope="session")
def _square_teacher():
    model, acc = train_square_teacher()
    assert acc > 0.9, acc
    return model


@pytest.fixture
def teacher(_square_teacher):
    """A fresh copy per test: a BlackBoxAPI takes its teacher over."""
    return copy.deepcopy(_square_teacher)
