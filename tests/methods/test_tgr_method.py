"""TGR in the engine: the groups cover every teacher of the pool, are cached in the run directory and
reused without re-embedding."""
from __future__ import annotations

import json

from method_rounds import method_cfg, pool_classes


class _NoEmbedding:
    """A round whose TeacherPool must not be asked for anything: the groups come from the cache."""
    def on_teachers(self, *a, **k):
        raise AssertionError("groups should have come from the cache")


def test_tgr_groups_cover_the_pool_and_are_cached(ma_pool, tmp_path):
    from raydfml.aggregation import build_rule
    from raydfml.methods.tgr import TaskGroups
    from raydfml.runtime.driver import Round
    from raydfml.runtime.executor import InProcessExecutor

    root, entries = ma_pool
    cfg = method_cfg(root, "tgr", 0)
    ex = InProcessExecutor(cfg, entries, pool_classes(entries))
    groups = TaskGroups(cfg, entries, tmp_path).groups(0, Round(0, cfg, ex, entries, tmp_path, build_rule(cfg)))
    assert sorted(i for g in groups for i in g) == list(range(len(entries)))     # all teachers (TGR's bug B3)
    assert len(groups) == cfg.section("tgr").groups
    doc = json.loads((tmp_path / "tgr_groups.json").read_text())
    assert doc["groups"] == groups and len(doc["similarity"]) == len(entries)
    assert len(ex.meta.bank) > 0                                   # the embedding phase's data is banked
    cached = TaskGroups(cfg, entries, tmp_path)
    assert cached.groups(5, _NoEmbedding()) == groups
    tids = cached.round_teachers(3, _NoEmbedding())
    assert set(tids) <= set(groups[cached.round_group(3, _NoEmbedding())]) and len(set(tids)) == len(tids)
    # keyed by the teachers' identity: the same positions holding other teachers re-embed
    import dataclasses

    swapped = [dataclasses.replace(e, record=dataclasses.replace(e.record, sha256="0" * 64)) if i == 0 else e
               for i, e in enumerate(entries)]
    try:
        TaskGroups(cfg, swapped, tmp_path).groups(0, _NoEmbedding())
        raise RuntimeError("a cache of other teachers was reused")
    except AssertionError as e:
        assert "cache" in str(e)


def test_random_regrouping_keeps_the_sizes_and_every_teacher():
    from raydfml.methods.tgr import random_regrouping

    groups = [[0, 3, 5], [1, 2], [4, 6, 7, 8]]
    shuffled = random_regrouping(groups, seed=1)
    assert [len(g) for g in shuffled] == [3, 2, 4]
    assert sorted(i for g in shuffled for i in g) == list(range(9)) and shuffled != groups
    assert random_regrouping(groups, seed=1) == shuffled
