"""Fixtures of the synthesis tests: a tiny conv4 teacher with meaningful BN statistics, trained in
seconds on blob images (helpers in synth_blobs.py)."""
from __future__ import annotations

import pytest

from synth_blobs import one_thread, train_blob_teacher


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # Module scope: autouse fixtures of a scope are set up before the other fixtures of that scope,
    # so module-scoped results (e.g. a recovery shared by several tests) are computed under it too.
    with one_thread():
        yield


@pytest.fixture(scope="session")
def blob_teacher():
    with one_thread():
        model, acc = train_blob_teacher()
    assert acc > 0.95, acc
    return model
