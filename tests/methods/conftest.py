"""Fixtures for the method tests: the ma smoke pool (conv4 + resnet10 + resnet18, 4 teachers each)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ma_pool(tmp_path_factory):
    """The ma smoke pool on the smoke glyph set: (data root, pool entries)."""
    from method_rounds import method_cfg

    from raydfml.data.layout import ensure_dataset
    from raydfml.runtime.pool import prepare_pool

    root = tmp_path_factory.mktemp("ma-data")
    ensure_dataset(root, "glyphs-smoke")
    entries = prepare_pool(method_cfg(root, "tgr", 0), workers=0, progress=False)
    return root, entries
