"""The learner tests run many tiny ops; intra-op threads only add synchronisation overhead there
(and are badly hurt by a busy machine), so pin torch to one thread here and restore it afterwards.
One thread also makes the CPU numbers independent of the core count."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
