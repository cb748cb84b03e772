"""Glyph domain sets of scenario md: sizes, splits, disjoint classes across domains, registry names."""
from __future__ import annotations

import pytest

from raydfml.config import resolve
from raydfml.data.glyphs import available_classes, read_marker
from raydfml.data.layout import (DOMAIN_IMAGES_PER_CLASS, DOMAIN_MAX_CLASSES, domain_split, ensure_dataset,
                                 glyph_set_params, load_split)
from raydfml.data.registry import SPLITS, get_spec
from raydfml.errors import UserError


@pytest.fixture(scope="module")
def smoke_domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    for name in ("glyphs-smoke-latin", "glyphs-smoke-greek"):
        ensure_dataset(root, name)
    return root


def test_smoke_domains_have_their_size_and_disjoint_class_names(smoke_domains):
    names = {}
    for name, script in (("glyphs-smoke-latin", "latin"), ("glyphs-smoke-greek", "greek")):
        marker = read_marker(smoke_domains / name)
        assert marker["domain"] == script and marker["classes"] == 18 and marker["images_per_class"] == 30
        splits = {s: load_split(smoke_domains, name, s) for s in SPLITS}
        assert [splits[s].num_classes for s in SPLITS] == [8, 5, 5]
        assert all((splits[s].class_counts() == 30).all() for s in SPLITS)
        names[name] = {c for s in SPLITS for c in splits[s].class_names}
        assert len(names[name]) == 18 and all(script in c for c in names[name])
    assert not names["glyphs-smoke-latin"] & names["glyphs-smoke-greek"]


@pytest.mark.parametrize("script, classes, split", [
    ("latin", 60, (39, 9, 12)),         # capped at DOMAIN_MAX_CLASSES of 232
    ("armenian", 58, (38, 9, 11)),
    ("cyrillic", 47, (31, 7, 9)),
    ("georgian", 41, (27, 6, 8)),
    ("greek", 37, (25, 5, 7)),          # every Greek letter; val at the 5-class floor
])
def test_full_domain_sets_are_sized_for_two_cores(script, classes, split):
    params = glyph_set_params(f"glyphs-{script}")
    assert params == {"name": f"glyphs-{script}", "domain": script, "classes": classes,
                      "images_per_class": DOMAIN_IMAGES_PER_CLASS, "split": split}
    assert classes == min(DOMAIN_MAX_CLASSES, available_classes(script)) and sum(split) == classes
    assert DOMAIN_IMAGES_PER_CLASS <= 200 and classes <= 60


def test_domain_split_floor_and_too_small():
    assert domain_split(100) == (64, 16, 20)
    assert domain_split(20) == (10, 5, 5)      # 16% and 20% of 20 are 3 and 4: raised to 5
    with pytest.raises(UserError, match="too small"):
        domain_split(14)


def test_registry_knows_domain_names_and_rejects_unknown_scripts():
    assert get_spec("glyphs-smoke-greek").embedded and get_spec("Glyphs-Latin").name == "glyphs-latin"
    assert get_spec("glyphs-smoke").embedded
    with pytest.raises(UserError, match="glyphs-<script>"):
        get_spec("glyphs-klingon")
    with pytest.raises(UserError, match="glyphs-<script>"):
        get_spec("glyphs-smoke-klingon")


def test_md_smoke_profile_uses_two_smoke_domains():
    cfg = resolve("md", "free", "smoke")
    assert cfg.data.domains == ("glyphs-smoke-latin", "glyphs-smoke-greek")
    assert cfg.data.dataset == "glyphs-smoke-latin"
    full = resolve("md", "free", "quick")
    assert full.data.domains == ("glyphs-latin", "glyphs-greek", "glyphs-cyrillic", "glyphs-armenian")
    assert resolve("mr", "deepinv", "smoke").data.domains == ()
    chosen = resolve("md", "free", "smoke", {"data.domains": "glyphs-smoke-cyrillic,glyphs-smoke-greek"})
    assert chosen.data.domains == ("glyphs-smoke-cyrillic", "glyphs-smoke-greek")
