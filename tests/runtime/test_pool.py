"""The teacher pool across domains (scenario md): one zoo per (domain, architecture), global class ids."""
from __future__ import annotations

from pathlib import Path

import pytest

from raydfml.config import resolve
from raydfml.errors import UserError
from raydfml.runtime.pool import (CLASS_OFFSET_STRIDE, PoolEntry, class_offset, existing_pool, pool_datasets,
                                  prepare_pool, zoo_config, zoo_dir_for)

DOMAINS = ("glyphs-smoke-latin", "glyphs-smoke-greek")


def _cfg(root, **overrides):
    return resolve("md", "free", "smoke", {"data.data_root": str(root), **overrides})


@pytest.fixture(scope="module")
def md_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("md-pool")
    cfg = _cfg(root)
    return cfg, prepare_pool(cfg, workers=0, progress=False)


def test_one_zoo_per_domain_with_global_class_offsets(md_pool):
    cfg, entries = md_pool
    n = cfg.pool.num_per_arch
    assert pool_datasets(cfg) == DOMAINS
    assert [e.index for e in entries] == list(range(2 * n))
    for d, domain in enumerate(DOMAINS):
        part = entries[d * n:(d + 1) * n]
        assert {e.dataset for e in part} == {domain} and {e.record.dataset for e in part} == {domain}
        assert {e.class_offset for e in part} == {CLASS_OFFSET_STRIDE * d} == {class_offset(cfg, domain)}
        assert {Path(e.zoo_dir).name.split("-conv4")[0] for e in part} == {domain}
        for e in part:
            assert e.global_classes == tuple(c + 1000 * d for c in e.record.classes)
            assert all(0 <= c < 8 for c in e.record.classes)     # each smoke domain has 8 meta-train classes
    latin = {c for e in entries[:n] for c in e.global_classes}
    greek = {c for e in entries[n:] for c in e.global_classes}
    local_latin = {c for e in entries[:n] for c in e.record.classes}
    local_greek = {c for e in entries[n:] for c in e.record.classes}
    assert local_latin & local_greek          # both domains have a "class 3" ...
    assert not latin & greek                  # ... which the global ids keep apart
    assert min(greek) >= 1000 and max(latin) < 1000


def test_existing_pool_equals_prepared_pool(md_pool):
    cfg, entries = md_pool
    assert existing_pool(cfg) == entries
    assert prepare_pool(cfg, workers=0, progress=False) == entries    # a rebuild reuses every teacher


def test_zoo_config_and_dir_take_the_dataset(md_pool, tmp_path):
    cfg, _ = md_pool
    dirs = {d: zoo_dir_for(cfg, zoo_config(cfg, "conv4", d)) for d in DOMAINS}
    assert dirs[DOMAINS[0]] != dirs[DOMAINS[1]] and all(d in str(p) for d, p in dirs.items())
    assert zoo_config(cfg, "conv4").dataset == cfg.data.dataset == DOMAINS[0]
    # --zoo-dir names a single zoo; with two domains it holds one derived sub-folder per zoo
    many = _cfg(cfg.data.data_root, **{"pool.zoo_dir": str(tmp_path / "z")})
    assert zoo_dir_for(many, zoo_config(many, "conv4", DOMAINS[1])) == (tmp_path / "z").resolve() / dirs[DOMAINS[1]].name
    ma = resolve("ma", "free", "smoke", {"data.data_root": str(tmp_path), "pool.zoo_dir": str(tmp_path / "z")})
    assert {zoo_dir_for(ma, zoo_config(ma, a)).parent for a in ma.pool.archs} == {(tmp_path / "z").resolve()}
    one = resolve("mr", "deepinv", "smoke", {"data.data_root": str(tmp_path), "pool.zoo_dir": str(tmp_path / "z")})
    assert zoo_dir_for(one, zoo_config(one, "conv4")) == (tmp_path / "z").resolve()


def test_single_dataset_pool_and_plain_entries_keep_offset_zero(md_pool, tmp_path):
    _, entries = md_pool
    rec = entries[-1].record
    plain = PoolEntry(0, "somewhere", rec)               # the pre-md construction still works
    assert plain.dataset == rec.dataset and plain.class_offset == 0 and plain.global_classes == rec.classes
    mr = resolve("mr", "deepinv", "smoke", {"data.data_root": str(tmp_path)})
    assert pool_datasets(mr) == ("glyphs-smoke",) and class_offset(mr, "glyphs-smoke") == 0


def test_bad_domain_lists_are_user_errors(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(UserError, match="not one of the pool's datasets"):
        class_offset(cfg, "glyphs-smoke-cyrillic")
    twice = _cfg(tmp_path, **{"data.domains": "glyphs-smoke-greek,glyphs-smoke-greek"})
    with pytest.raises(UserError, match="twice"):
        pool_datasets(twice)


def test_the_architectures_of_a_pool_get_their_own_class_plans(tmp_path):
    """pool.arch_plans=distinct: resnet10's teachers continue the plan numbers after conv4's, so the
    three zoos of ma do not repeat one set of class subsets (shared: the old behaviour, 23 of 64
    classes for ma quick's 18 teachers; distinct: 47)."""
    from raydfml.zoo import plan_classes

    def covered(**over):
        cfg = resolve("ma", "free", "quick", {"data.data_root": str(tmp_path), **over})
        zcfgs = [zoo_config(cfg, a) for a in cfg.pool.archs]
        assert len({zoo_dir_for(cfg, z) for z in zcfgs}) == 3
        return zcfgs, {c for z in zcfgs for plan in plan_classes(z, 64) for c in plan}

    distinct, cov = covered()
    assert [z.plan_offset for z in distinct] == [0, 6, 12] and len(cov) == 47
    shared, cov_shared = covered(**{"pool.arch_plans": "shared"})
    assert [z.plan_offset for z in shared] == [0, 0, 0] and len(cov_shared) == 23
    # the first zoo (and every single-architecture pool) keeps its plans and its directory
    assert zoo_dir_for(resolve("mr", "deepinv", "quick", {"data.data_root": str(tmp_path)}),
                       zoo_config(resolve("mr", "deepinv", "quick", {"data.data_root": str(tmp_path)}), "conv4")).name \
        .endswith("n10-s0-e4")
    with pytest.raises(UserError, match="pool.arch_plans"):
        resolve("ma", "free", "smoke", {"pool.arch_plans": "nope"})
