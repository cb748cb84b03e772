import json

import numpy as np
import pytest
import torch

from raydfml.aggregation.task_space import (fisher_embedding, fisher_segments, heterogeneous_groups, load_groups,
                                            make_probe, normalized_cut, save_groups, task_similarity)

from agg_blobs import CLASS_SETS, MEAN, STD, SIZE


def naive_similarity(e: torch.Tensor, eps: float = 1e-6, segments=None) -> torch.Tensor:
    """Task2Vec's normalised cosine, one pair and one segment at a time (the reference)."""
    m = e.shape[0]
    bounds = [(0, e.shape[1])] if segments is None else \
        [(sum(segments[:k]), sum(segments[:k + 1])) for k in range(len(segments))]
    s = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            vals = []
            for lo, hi in bounds:
                a, b = e[i, lo:hi].double(), e[j, lo:hi].double()
                an, bn = a / (a + b + eps), b / (a + b + eps)
                den = an.norm() * bn.norm()
                vals.append(float(an @ bn / den) if den > 0 else 0.0)
            s[i, j] = sum(vals) / len(vals)
    s.fill_diagonal_(1.0)
    return s


@pytest.fixture(scope="module")
def similarity(teacher_data):
    probe = make_probe(0, image_size=SIZE)
    emb = torch.stack([fisher_embedding(probe, x, y, MEAN, STD) for x, y in teacher_data])
    return task_similarity(emb)


def assert_shared_class_sets_rank_higher(s: torch.Tensor) -> None:
    same = {(0, 1), (2, 3)}
    for i in range(4):
        partner = next(j for p in same for j in p if i in p and j != i)
        others = [j for j in range(4) if j not in (i, partner)]
        assert s[i, partner] > max(s[i, j] for j in others), (i, s)


def test_similarity_ranks_teachers_sharing_a_class_set_higher(similarity):
    # Teachers 1 and 3 list their classes in another head order than 0 and 2: the fitted head makes
    # the embedding follow the class set, not the label order.
    assert CLASS_SETS[0] != CLASS_SETS[1] and set(CLASS_SETS[0]) == set(CLASS_SETS[1])
    assert_shared_class_sets_rank_higher(similarity)


def test_a_zoo_teacher_works_as_the_probe_too(teacher_data, probe_teacher):
    emb = torch.stack([fisher_embedding(probe_teacher, x, y, MEAN, STD) for x, y in teacher_data])
    assert_shared_class_sets_rank_higher(task_similarity(emb))


def test_groups_mix_dissimilar_teachers(similarity):
    groups = heterogeneous_groups(similarity, 2, seed=42)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    assert len(groups) == 2
    for g in groups:                       # one teacher of each class set per group
        assert len(set(g) & {0, 1}) == 1 and len(set(g) & {2, 3}) == 1, groups


def test_fisher_embedding_is_deterministic_and_leaves_the_probe_alone(teacher_data):
    probe = make_probe(3, image_size=SIZE)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    x, y = teacher_data[0]
    torch.manual_seed(0)
    expected_rng = torch.rand(2)
    torch.manual_seed(0)
    a = fisher_embedding(probe, x, y, MEAN, STD, head_steps=5)
    assert torch.equal(torch.rand(2), expected_rng)                     # global RNG untouched
    b = fisher_embedding(probe, x, y, MEAN, STD, head_steps=5)
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.dim() == 1
    assert (a >= 0).all() and a.sum() > 0
    assert a.numel() == sum(fisher_segments(probe)) == sum(p.numel() for n, p in probe.named_parameters()
                                                           if not n.startswith("classifier."))
    assert all(torch.equal(before[k], v) for k, v in probe.state_dict().items())
    assert all(p.grad is None for p in probe.parameters())
    filt = fisher_embedding(probe, x, y, MEAN, STD, head_steps=5, reduce="filter")
    assert filt.numel() == sum(fisher_segments(probe, reduce="filter")) < a.numel()
    assert fisher_embedding(probe, x, y, MEAN, STD, head_steps=5, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_per_sample_fisher_equals_batch_fisher_with_batches_of_one(teacher_data):
    # BN statistics are calibrated once, so each image's loss is one function of that image alone:
    # the vmapped per-sample Fisher must equal the batch Fisher with one image per batch.
    probe = make_probe(1, image_size=SIZE)
    x, y = teacher_data[2]
    x, y = x[:12], y[:12]
    per_sample = fisher_embedding(probe, x, y, MEAN, STD, batch=5, head_steps=3)
    singles = fisher_embedding(probe, x, y, MEAN, STD, batch=1, per_sample=False, head_steps=3)
    assert torch.allclose(per_sample, singles, rtol=1e-4, atol=1e-10)


def test_vectorised_similarity_equals_the_naive_double_loop():
    g = torch.Generator().manual_seed(0)
    e = torch.rand(6, 53, generator=g, dtype=torch.float64) ** 3
    e[2, :10] = 0                                    # zero coordinates on one side
    e[4] = e[1] * 3.0                                # a scaled copy
    for max_elements in (1 << 22, 36 * 7):           # one chunk, and chunks that cut across the vector
        got = task_similarity(e, max_elements=max_elements)
        assert got.dtype == torch.float64
        assert torch.allclose(got, naive_similarity(e), atol=1e-12)
        segs = [10, 3, 30, 10]
        assert torch.allclose(task_similarity(e, segments=segs, max_elements=max_elements),
                              naive_similarity(e, segments=segs), atol=1e-12)
    s32 = task_similarity(e.float())
    assert s32.dtype == torch.float32 and torch.allclose(s32.double(), naive_similarity(e), atol=1e-5)
    assert torch.equal(s32, s32.T) and torch.all(s32.diagonal() == 1)


def test_similarity_edge_cases():
    e = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    s = task_similarity(e, eps=0.0)
    assert s[0, 1] == pytest.approx(1.0)            # identical tasks
    assert s[0, 3] == 0.0                            # disjoint support: orthogonal
    assert s[0, 2] == 0.0 and s[2, 2] == 1.0         # an all-zero embedding is similar to nothing else
    with pytest.raises(ValueError, match="non-negative"):
        task_similarity(-e)
    with pytest.raises(ValueError, match="segments"):
        task_similarity(e, segments=[1, 1])


def test_groups_cover_all_teachers_and_are_deterministic():
    # 12 teachers from 3 task families; TGR clustered only the first 100 of 300 teachers (B3).
    fam = np.repeat(np.arange(3), 4)
    rng = np.random.default_rng(0)
    s = np.where(fam[:, None] == fam[None, :], 0.9, 0.5) + rng.normal(0, 0.02, (12, 12))
    s = (s + s.T) / 2
    np.fill_diagonal(s, 1.0)
    groups = heterogeneous_groups(s, 4, seed=7)
    assert groups == heterogeneous_groups(torch.tensor(s), 4, seed=7)
    assert sorted(i for g in groups for i in g) == list(range(12))
    assert all(len(set(fam[g])) == min(3, len(g)) for g in groups), groups     # every group mixes families
    assert heterogeneous_groups(s, 1) == [list(range(12))]
    assert heterogeneous_groups(s, 12) == [[i] for i in range(12)]
    assert heterogeneous_groups(np.ones((4, 4)), 2) == [[0, 2], [1, 3]]        # all identical: round-robin
    with pytest.raises(ValueError, match="n_groups"):
        heterogeneous_groups(s, 13)


def test_refinement_repairs_a_degenerate_spectral_split():
    # Two families of two: D is bipartite, every balanced mixing has the same normalised cut and the
    # relaxation's eigenvectors are degenerate. Refining never worsens the cut and ends mixed.
    s = np.array([[1, .9, .6, .6], [.9, 1, .6, .6], [.6, .6, 1, .9], [.6, .6, .9, 1]])
    d = 1 - s
    np.fill_diagonal(d, 0)

    def ncut(groups):
        labels = np.zeros(4, int)
        for k, g in enumerate(groups):
            labels[g] = k
        return normalized_cut(d, labels)
    raw, refined = heterogeneous_groups(s, 2, refine=False), heterogeneous_groups(s, 2)
    assert ncut(refined) <= ncut(raw) + 1e-12
    assert all(len(set(g) & {0, 1}) == 1 for g in refined), refined
    assert ncut(refined) == pytest.approx(ncut([[0, 2], [1, 3]]))


def test_groups_json_cache_round_trip(tmp_path):
    path = tmp_path / "run" / "tgr_groups.json"
    groups = [[0, 3], [1, 2]]
    assert load_groups(path) is None                                     # no cache yet
    save_groups(path, groups, teacher_ids=[10, 11, 12, 13], similarity=torch.eye(4), rounds=0)
    assert not list(path.parent.glob("*.tmp"))
    assert load_groups(path) == groups
    assert load_groups(path, teacher_ids=[10, 11, 12, 13]) == groups
    assert load_groups(path, teacher_ids=[10, 11, 12, 14]) is None       # another pool: recompute
    doc = json.loads(path.read_text())
    assert doc["similarity"][0] == [1.0, 0.0, 0.0, 0.0] and doc["meta"] == {"rounds": 0}
    with pytest.raises(ValueError, match="partition"):
        save_groups(path, [[0, 1], [1, 2]])
