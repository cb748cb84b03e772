"""Meta-test protocol: fixed seeded task sets, determinism, the CI formula, and teacher averaging."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from raydfml.data import ImageSplit, get_spec, normalize
from raydfml.evaluation import EvalResult, evaluate, evaluate_many, summarize, teacher_average


def separable_split(classes=8, per_class=20, size=4, split="meta_test") -> ImageSplit:
    """Class c's images are all ~30*c (+ row noise 0..3): trivially separable by nearest centroid."""
    labels = np.repeat(np.arange(classes), per_class).astype(np.int64)
    noise = np.arange(len(labels)) % 4
    vals = (30 * labels + noise).astype(np.uint8)
    images = np.broadcast_to(vals[:, None, None, None], (len(labels), 3, size, size)).copy()
    return ImageSplit(images, labels, [f"c{c}" for c in range(classes)], get_spec("glyphs"), split)


class NearestCentroid:
    """Stand-in learner: class means of the support, the query's nearest one wins."""

    def predict(self, params, xs, ys, xq, steps=None):
        way = int(ys.max()) + 1
        cent = torch.stack([xs[ys == c].flatten(1).mean(0) for c in range(way)])
        return -torch.cdist(xq.flatten(1), cent) * params["scale"]


class RandomGuess:
    """Stand-in learner: random logits from torch's global RNG (which evaluate seeds per task)."""

    def predict(self, params, xs, ys, xq, steps=None):
        return torch.randn(len(xq), int(ys.max()) + 1, device=xq.device)


class Recorder:
    """Records what it is shown, predicts class 0."""

    def __init__(self):
        self.seen = []

    def predict(self, params, xs, ys, xq, steps=None):
        self.seen.append((xs.clone(), ys.clone(), xq.clone(), steps))
        return torch.zeros(len(xq), int(ys.max()) + 1)


def test_perfect_model_gets_100_and_zero_ci():
    split = separable_split()
    for shot in (1, 5):
        r = evaluate(NearestCentroid(), {"scale": torch.tensor(1.0)}, split, shot=shot, tasks=30, seed=1)
        assert (r.way, r.shot, r.tasks) == (5, shot, 30)
        assert r.accuracy == 100.0 and r.ci95 == 0.0
        assert r.record() == {"way": 5, "shot": shot, "tasks": 30, "accuracy": 100.0, "ci95": 0.0}


def test_random_predictions_near_chance_and_deterministic():
    split = separable_split()
    a = evaluate(RandomGuess(), None, split, tasks=200, seed=3)
    assert abs(a.accuracy - 20.0) < 3.0
    assert 0.0 < a.ci95 < 2.0
    # Deterministic: unaffected by whatever consumed the RNG before.
    torch.manual_seed(12345)
    torch.randn(1000)
    b = evaluate(RandomGuess(), None, split, tasks=200, seed=3)
    assert a.per_task == b.per_task and a.accuracy == b.accuracy and a.ci95 == b.ci95
    c = evaluate(RandomGuess(), None, split, tasks=200, seed=4)
    assert c.per_task != a.per_task


def test_evaluate_does_not_disturb_caller_rng():
    split = separable_split()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    evaluate(RandomGuess(), None, split, tasks=5, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_ci_formula_sample_std():
    split = separable_split()
    r = evaluate(RandomGuess(), None, split, tasks=50, seed=0)
    acc = np.array(r.per_task)
    assert len(acc) == 50
    assert r.accuracy == pytest.approx(acc.mean())
    assert r.ci95 == pytest.approx(1.96 * acc.std(ddof=1) / math.sqrt(50))
    assert summarize([40.0, 60.0]) == pytest.approx((50.0, 1.96 * math.sqrt(200.0) / math.sqrt(2)))
    assert summarize([70.0]) == (70.0, 0.0)
    with pytest.raises(ValueError):
        summarize([])


def test_same_tasks_for_every_model_and_normalised_inputs():
    split = separable_split()
    r1, r2 = Recorder(), Recorder()
    evaluate(r1, None, split, shot=5, tasks=4, seed=2, steps=7)
    evaluate(r2, {"w": torch.zeros(1)}, split, shot=5, tasks=4, seed=2)
    assert len(r1.seen) == 4
    for (xs1, ys1, xq1, steps), (xs2, ys2, xq2, _) in zip(r1.seen, r2.seen):
        assert steps == 7
        assert torch.equal(xs1, xs2) and torch.equal(ys1, ys2) and torch.equal(xq1, xq2)
        assert xs1.dtype == torch.float32 and xs1.shape == (25, 3, 4, 4) and xq1.shape == (75, 3, 4, 4)
        assert ys1.tolist() == [c for c in range(5) for _ in range(5)]
    # Inputs are the split's images normalised with its spec.
    from raydfml.data import EpisodeSampler
    ep = EpisodeSampler(split, 5, 5, 15, seed=2).episode(0)
    assert torch.allclose(r1.seen[0][0], normalize(ep.support, split.spec, "cpu"))
    r3 = Recorder()
    evaluate(r3, None, split, shot=5, tasks=1, seed=3)
    assert not torch.equal(r3.seen[0][2], r1.seen[0][2])


def test_evaluate_many_and_str():
    split = separable_split()
    out = evaluate_many({"nc": (NearestCentroid(), {"scale": torch.tensor(2.0)}), "rand": (RandomGuess(), None)},
                        split, shots=(1, 5), tasks=10, seed=0)
    assert list(out) == ["nc", "rand"]
    assert [r.shot for r in out["nc"]] == [1, 5] and all(r.accuracy == 100.0 for r in out["nc"])
    assert out["rand"][0].per_task is None
    assert str(EvalResult(5, 1, 600, 48.4321, 1.08)) == "48.4 ± 1.1"
    assert EvalResult(5, 1, 600, 48.4, 1.1).setting == "5-way 1-shot"
    assert EvalResult.from_record(EvalResult(5, 5, 10, 60.0, 2.0).record()) == EvalResult(5, 5, 10, 60.0, 2.0)


def test_evaluate_validates_tasks():
    with pytest.raises(ValueError):
        evaluate(RandomGuess(), None, separable_split(), tasks=0)


def _net(hidden=4):
    return nn.Sequential(nn.Linear(3, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 2))


def test_teacher_average_means_parameters_only():
    torch.manual_seed(0)
    teachers = [_net() for _ in range(3)]
    for t in teachers:
        t[1].running_mean.fill_(5.0)
    meta = _net()
    avg = teacher_average([t.state_dict() for t in teachers], meta)
    assert set(avg) == {n for n, _ in meta.named_parameters()}
    for name, _ in meta.named_parameters():
        expected = torch.stack([t.state_dict()[name] for t in teachers]).mean(0)
        assert torch.allclose(avg[name], expected, atol=1e-6)
        assert avg[name].dtype == torch.float32
    assert "1.running_mean" not in avg
    meta.load_state_dict(avg, strict=False)


def test_teacher_average_rejects_mismatched_architectures():
    meta = _net(4)
    with pytest.raises(ValueError, match="shape"):
        teacher_average([_net(4).state_dict(), _net(8).state_dict()], meta)
    sd = _net(4).state_dict()
    del sd["2.bias"]
    with pytest.raises(ValueError, match="no parameter"):
        teacher_average([sd], meta)
    with pytest.raises(ValueError):
        teacher_average([], meta)


class OneStepLinear:
    """Stand-in MAML-like learner: one SGD step on the support needs autograd."""

    def predict(self, params, xs, ys, xq, steps=None):
        w = params["w"].clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(xs.flatten(1) @ w, ys)
        (g,) = torch.autograd.grad(loss, w)
        return xq.flatten(1) @ (w - 0.1 * g)


def test_inner_loop_gets_autograd_even_under_no_grad():
    split = separable_split()
    with torch.no_grad():
        r = evaluate(OneStepLinear(), {"w": torch.zeros(48, 5)}, split, tasks=3, seed=0)
    assert r.tasks == 3 and 0.0 <= r.accuracy <= 100.0
