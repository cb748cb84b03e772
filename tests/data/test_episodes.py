"""Episode sampling: determinism per (seed, index), disjoint support/query, relative labels, validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydfml.data import EpisodeSampler, ImageSplit, get_spec
from raydfml.errors import UserError


def make_split(counts=(20, 20, 20, 20, 20, 20), size=4) -> ImageSplit:
    """In-memory split where row r's pixels all equal r, so images identify their rows."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    n = len(labels)
    assert n <= 256
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 3, size, size)).copy()
    return ImageSplit(images, labels, [f"c{c}" for c in range(len(counts))], get_spec("glyphs"), "meta_test")


def test_shapes_labels_and_class_major_order():
    split = make_split()
    ep = EpisodeSampler(split, way=5, shot=2, query=3, seed=1).episode(0)
    assert ep.support.shape == (10, 3, 4, 4) and ep.support.dtype == torch.uint8
    assert ep.query.shape == (15, 3, 4, 4)
    assert ep.support_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_labels.tolist() == [r for r in range(5) for _ in range(3)]
    assert len(set(ep.classes.tolist())) == 5
    # Each image belongs to the class its relative label points at.
    for imgs, rel in ((ep.support, ep.support_labels), (ep.query, ep.query_labels)):
        rows = imgs[:, 0, 0, 0].long().numpy()
        assert (split.labels[rows] == ep.classes[rel].numpy()).all()


def test_support_and_query_disjoint():
    split = make_split()
    sampler = EpisodeSampler(split, way=5, shot=5, query=15, seed=3)
    for ep in sampler.episodes(20):
        sup = set(ep.support[:, 0, 0, 0].tolist())
        qry = set(ep.query[:, 0, 0, 0].tolist())
        assert len(sup) == 25 and len(qry) == 75 and not sup & qry
        assert ep.support_indices.tolist() == ep.support[:, 0, 0, 0].tolist()


def test_deterministic_per_seed_and_index():
    split = make_split()
    a = EpisodeSampler(split, way=5, shot=1, query=5, seed=7)
    b = EpisodeSampler(split, way=5, shot=1, query=5, seed=7)
    # Same episode regardless of what was drawn before.
    list(b.episodes(3))
    assert torch.equal(a.episode(4).query, b.episode(4).query)
    assert torch.equal(a.episode(4).classes, b.episode(4).classes)
    assert not torch.equal(a.episode(4).query_indices, a.episode(5).query_indices)
    c = EpisodeSampler(split, way=5, shot=1, query=5, seed=8)
    assert not torch.equal(a.episode(4).query_indices, c.episode(4).query_indices)
    # Iteration and episodes(n) agree.
    it = iter(a)
    assert all(torch.equal(next(it).support, e.support) for e in a.episodes(3))


def test_too_few_images_names_the_class():
    split = make_split(counts=(20, 20, 7, 20, 20, 20))
    with pytest.raises(UserError, match=r"'c2'.*meta_test.*7 images.*16"):
        EpisodeSampler(split, way=5, shot=1, query=15)
    EpisodeSampler(split, way=5, shot=1, query=6)  # 7 images suffice for 1+6


def test_way_larger_than_classes():
    with pytest.raises(UserError, match="7-way.*6"):
        EpisodeSampler(make_split(), way=7)


def test_episode_to_device():
    ep = EpisodeSampler(make_split(), way=2, shot=1, query=1).episode(0).to("cpu")
    assert ep.way == 2 and ep.support.device.type == "cpu"


def test_a_class_subset_restricts_every_episode_and_leaves_the_default_stream_unchanged():
    split = make_split()
    full, sub = EpisodeSampler(split, way=3, shot=1, query=2, seed=5), \
        EpisodeSampler(split, way=3, shot=1, query=2, seed=5, classes=[4, 1, 2, 1])
    assert EpisodeSampler(split, way=3, shot=1, query=2, seed=5, classes=None).indices(7)[0].tolist() == \
        full.indices(7)[0].tolist()
    drawn = {int(c) for i in range(40) for c in sub.episode(i).classes}
    assert drawn == {1, 2, 4}
    with pytest.raises(UserError, match="of the requested ones"):
        EpisodeSampler(split, way=3, shot=1, query=2, classes=[0, 1])
    with pytest.raises(UserError, match="not among"):
        EpisodeSampler(split, way=3, shot=1, query=2, classes=[0, 1, 99])
