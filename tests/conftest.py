"""Shared fixtures: one Ray instance per test session and a small embedded glyph dataset."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# Every process a test starts (launch.py subprocesses, Ray workers, Tune trials) inherits one intra-op
# thread. Two pytest-xdist workers each running a run with torch's default of one thread per core
# oversubscribe a 2-core CI machine, and OpenMP's spinning threads then make a smoke run ten times
# slower (two concurrent `launch.py --profile smoke` runs: 271 s with the default, 28 s with this).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import pytest
import torch

# Tests check behaviour, not speed: one thread in the test processes too (see OMP_NUM_THREADS above).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray with a *logical* GPU, so GPU-fraction scheduling is exercised on CPU machines."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests that start Ray are marked ``ray`` (so ``pytest -m "not ray and not e2e"`` runs the fast ones)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory):
    """Data root with the smoke glyph set and scenario mr's smoke zoo already built (a warm cache)."""
    from raydfml.config import resolve
    from raydfml.data.layout import ensure_dataset
    from raydfml.runtime.pool import prepare_pool

    root = tmp_path_factory.mktemp("smoke-data")
    ensure_dataset(root, "glyphs-smoke")
    prepare_pool(resolve("mr", "deepinv", "smoke", {"data.data_root": str(root), "runtime.workers": 0}),
                 workers=0, progress=False)
    return root


@pytest.fixture(scope="session")
def glyph_root(tmp_path_factory):
    """A small glyph dataset (20 classes split 10/5/5, 30 images each) under a session temp root."""
    from raydfml.data.glyphs import generate_glyphs

    root = tmp_path_factory.mktemp("data")
    generate_glyphs(root, name="glyphs", seed=0, classes=20, images_per_class=30, split=(10, 5, 5), progress=False)
    return root
