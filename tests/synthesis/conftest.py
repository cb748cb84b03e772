"""Fixtures of the synthesis tests: a tiny conv4 teacher with meaningful BN statistics, trained in
seconds on blob images (helpers in synth_blobs.py)."""
from __future__ import annotations

import pytest

from synth_blobs import train_blob_teacher


@pytest.fixture(scope="session")
def blob_teacher():
    model, acc = train_blob_teacher()
    assert acc > 0.95, acc
    return model
