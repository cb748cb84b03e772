"""Fixtures for the task-space and aggregation tests (the data helpers live in ``agg_blobs``, a
uniquely named module: several test folders have a ``conftest`` and only one can be imported by name)."""
from __future__ import annotations

import pytest
import torch

from agg_blobs import CLASS_SETS, PROBE_CLASSES, TEACHER_SEEDS, blob_images, normalize, train_teacher

# The aggregation tests run many tiny ops on a small shared CPU; intra-op threads only add overhead.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def teachers():
    return [train_teacher(c, s) for c, s in zip(CLASS_SETS, TEACHER_SEEDS)]


@pytest.fixture(scope="session")
def probe_teacher():
    """A trained zoo-like teacher on a class mix, used as a fixed (offline) probe network."""
    return train_teacher(PROBE_CLASSES, 9)


@pytest.fixture(scope="session")
def teacher_data(teachers):
    """Per teacher: real-ish images of its classes, labelled by the teacher's argmax (the stand-in for
    its recovered task; inversion itself is tested under tests/synthesis)."""
    out = []
    for i, (t, c) in enumerate(zip(teachers, CLASS_SETS)):
        x, _ = blob_images(c, 30, seed=100 + i)
        with torch.no_grad():
            out.append((x, t(normalize(x)).argmax(1)))
    return out
