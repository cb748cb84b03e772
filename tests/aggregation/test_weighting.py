"""Task weighting (MTM) rules: each moves its weights the way its objective says, the uncertainty
rule's gradient has the right sign, state round-trips exactly, and the MetaLearner applies them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydfml.aggregation.weighting import WEIGHTINGS, build_weighting, gain
from raydfml.config import WeightingConfig, resolve
from raydfml.errors import UserError

ITEMS = [("a",), ("b",)]
LOSSES = [2.0, 0.5]                  # task a's loss is 4x task b's: MTM's optimum is w^2 = L
# Gains small enough that SPSA resolves the objective (the spec's re-simulation: c ~ |w|)
RESOLVING = {"spsa": dict(alpha=0.01, beta=0.05, schedule="constant"),
             "spsa_track": dict(alpha=0.01, beta=0.05, schedule="constant"),
             "per_class": dict(alpha=0.01, beta=0.05, schedule="constant"),
             "uncertainty": dict(lr=0.05)}


def _run(name: str, updates: int, seed: int = 0, items=ITEMS, losses=LOSSES, **options):
    w = WEIGHTINGS.get(name)(WeightingConfig(**options), batch=len(items))
    rng = np.random.default_rng(seed)
    for _ in range(updates):
        w.weights(items)
        w.step(items, losses, rng)
    return w


@pytest.mark.parametrize("name", sorted(RESOLVING))
def test_each_rule_down_weights_the_high_loss_task_towards_mtm_optimum(name):
    """F = mean(L/w^2 + ln w^2) is minimal at w^2 = L: the 4x-loss task ends with ~1/4 the weight."""
    w = _run(name, 1000, **RESOLVING[name])
    lam = w.weights(ITEMS)
    assert lam.mean() == pytest.approx(1.0)
    assert 3.0 < lam[1] / lam[0] < 4.5, lam


@pytest.mark.parametrize("name", ["spsa", "spsa_track", "per_class"])
def test_the_seed_gains_move_the_right_way_but_barely(name):
    """The seed's a = 0.25/k^(1/6), c = 15/k^(1/24): c far above |w|, so the loss enters only as L/c^2."""
    lam = _run(name, 1000).weights(ITEMS)
    assert 1.0 < lam[1] / lam[0] < 1.1, lam


def test_uncertainty_gradient_has_the_sign_of_its_objective():
    """dF/ds = 1 - L exp(-s) (s = ln w^2): negative while L > w^2, so s rises towards ln L. The seed's
    gradient variant never moved w in its 'Backprop' mode (an empty optimiser)."""
    w = WEIGHTINGS.get("uncertainty")(WeightingConfig(), batch=2)
    w.weights(ITEMS)                                  # creates both keys at w = 1 (s = 0)
    g = w.grad(ITEMS, LOSSES)
    s = torch.zeros(2, requires_grad=True)
    loss = torch.tensor(LOSSES)
    (torch.mean(loss * torch.exp(-s) + s)).backward()
    assert g["a"] == pytest.approx(float(s.grad[0])) and g["b"] == pytest.approx(float(s.grad[1]))
    assert g["a"] < 0 < g["b"]
    w.step(ITEMS, LOSSES, np.random.default_rng(0))
    assert w.s("a") > 0 > w.s("b")                    # the high-loss task's w^2 grows: its weight falls


def test_uniform_rule_is_the_plain_mean():
    w = _run("none", 10)
    assert np.array_equal(w.weights(ITEMS), np.ones(2)) and w.state_dict() == {"w": {}, "k": 0}


@pytest.mark.parametrize("name", ["spsa", "spsa_track", "per_class", "uncertainty"])
def test_state_round_trips_exactly(name):
    a = _run(name, 7, seed=3)
    b = WEIGHTINGS.get(name)(WeightingConfig(), batch=2)
    b.load_state_dict(a.state_dict())
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    for losses in ([1.0, 3.0], [0.2, 0.4], [5.0, 1.0]):
        a.step(ITEMS, losses, rng_a)
        b.step(ITEMS, losses, rng_b)
    assert a.w == b.w and a.k == b.k


def test_gain_schedules():
    assert gain(0.25, 1 / 6, 64, "power", 0, 1) == pytest.approx(0.25 / 2)
    assert gain(0.25, 1 / 6, 64, "constant", 0, 1) == 0.25
    assert gain(1.0, 0, 25, "step", 10, 0.5) == pytest.approx(0.25)


def test_spsa_normalises_every_n_updates():
    w = _run("spsa", 100)                             # the seed's N = 100
    assert math.sqrt(sum(v * v for v in w.w.values())) == pytest.approx(1.0)


def test_weighting_starts_at_its_round():
    cfg = resolve("mr", "deepinv", "smoke", {"aggregate.weighting": "uncertainty", "weighting.start": 2})
    w = build_weighting(cfg, "replay")
    w.active = False
    w.step(ITEMS, LOSSES, np.random.default_rng(0))
    assert w.k == 0 and np.array_equal(w.weights(ITEMS), np.ones(2))


def test_bad_weighting_options_are_one_line_errors():
    with pytest.raises(UserError, match="aggregate.weighting 'nope'.*spsa"):
        resolve("mr", "deepinv", "smoke", {"aggregate.weighting": "nope"})
    with pytest.raises(UserError, match="weighting.apply=replay"):
        resolve("ma", "free", "smoke", {"aggregate.weighting": "spsa"})       # align combines tasks itself
    resolve("ma", "free", "smoke", {"aggregate.weighting": "spsa", "weighting.apply": "replay"})
    with pytest.raises(UserError, match="train.source=real"):
        resolve("mr", "deepinv", "smoke", {"aggregate.weighting": "spsa", "weighting.apply": "teachers",
                                           "train.source": "real"})
    with pytest.raises(UserError, match="weighting.schedule"):
        resolve("mr", "deepinv", "smoke", {"aggregate.weighting": "spsa", "weighting.schedule": "cosine"})
    with pytest.raises(UserError, match="train.source"):
        resolve("mr", "deepinv", "smoke", {"train.source": "imagenet"})


def _meta_learner(smoke_root, **over):
    from raydfml.runtime.meta_learner import MetaLearner

    cfg = resolve("mr", "deepinv", "smoke", {"data.data_root": str(smoke_root), **over})
    return MetaLearner(cfg.to_dict(), [], device="cpu", load_val=False), cfg


def test_meta_learner_weights_teacher_gradients_by_their_keys(smoke_root):
    """Two teachers whose losses differ 4x: after the weights settle, the update leans to the low-loss one."""
    from raydfml.records import TeacherRecord

    ml, _ = _meta_learner(smoke_root, **{"aggregate.weighting": "uncertainty", "weighting.lr": 0.5})
    n = len(ml.flat_params())
    g0, g1 = np.zeros(n, np.float32), np.zeros(n, np.float32)
    g0[0], g1[1] = 1.0, 1.0
    records = [TeacherRecord(teacher=7, grad=g0, loss=2.0, classes=(0, 1)),
               TeacherRecord(teacher=9, grad=g1, loss=0.5, classes=(2, 3))]
    for _ in range(30):
        stats = ml.aggregate(0, records)
    last = ml.last_meta_grad()
    assert last[1] / last[0] == pytest.approx(4.0, rel=0.15)
    assert (last[0] + last[1]) / 2 == pytest.approx(0.5, rel=1e-5)   # weights have mean 1: a mean of the two
    assert stats["weight/teachers/keys"] == 2 and stats["weight/teachers/spread"] > 3
    assert set(ml.weights_report()["teachers"]) == {"t7", "t9"}


def test_replay_keys_are_classes_or_domains(smoke_root):
    ml, _ = _meta_learner(smoke_root, **{"aggregate.weighting": "spsa"})
    assert ml._class_keys((3, 1004)) == ("c3", "c1004")
    ml, _ = _meta_learner(smoke_root, **{"aggregate.weighting": "spsa", "weighting.key": "domain"})
    assert ml._class_keys((3, 1004, 1007)) == ("d0", "d1")
