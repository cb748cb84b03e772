"""MetaLearner's optimiser choices (train.kd_optimizer)."""
import pytest
import torch

from raydfml.config import resolve
from raydfml.errors import UserError
from raydfml.runtime.meta_learner import MetaLearner


def _learner(kd_optimizer: str) -> MetaLearner:
    cfg = resolve("mr", "deepinv", "smoke", {"train.kd_optimizer": kd_optimizer})
    return MetaLearner(cfg.to_dict(), [10, 20], device="cpu", load_val=False)


def _replay_progress(ml: MetaLearner, before_big_step: bool) -> float:
    """How far 5 replay-like steps with a unit gradient move the parameters along it, after 3 such
    steps (and, when asked, after a per-teacher step whose gradient is 1000x larger, random signs)."""
    unit = {n: torch.ones_like(p) for n, p in ml.params.items()}
    for _ in range(3):
        ml.step(unit)
    if before_big_step:
        gen = torch.Generator().manual_seed(0)
        ml.step({n: 1000 * torch.randint(0, 2, g.shape, generator=gen).float().mul(2).sub(1)
                 for n, g in unit.items()}, ml.kd_opt)
    start = ml.flat_params()
    for _ in range(5):
        ml.step(unit)
    return float((start - ml.flat_params()).mean())


def test_a_large_per_teacher_gradient_shrinks_replay_steps_only_with_a_shared_optimiser():
    torch.manual_seed(0)
    plain = _replay_progress(_learner("shared"), before_big_step=False)
    shared = _replay_progress(_learner("shared"), before_big_step=True)
    own = _replay_progress(_learner("own"), before_big_step=True)
    assert shared < 0.1 * plain               # Adam's second moment now holds the 1000x gradient
    assert own == pytest.approx(plain, rel=1e-4)


def test_own_optimiser_state_is_checkpointed_and_restored():
    ml = _learner("own")
    ml.step({n: torch.randn_like(p) for n, p in ml.params.items()}, ml.kd_opt)
    state = ml.state_dict()
    assert "kd_opt" in state and "kd_opt" not in _learner("shared").state_dict()
    other = _learner("own")
    other.load_state_dict(state)
    moments = [s["exp_avg_sq"] for s in other.kd_opt.state_dict()["state"].values()]
    expected = [s["exp_avg_sq"] for s in ml.kd_opt.state_dict()["state"].values()]
    assert moments and all(torch.equal(a, b) for a, b in zip(moments, expected))


def test_unknown_kd_optimizer_is_a_one_line_error():
    with pytest.raises(UserError, match="train.kd_optimizer"):
        resolve("mr", "deepinv", "smoke", {"train.kd_optimizer": "sgd"})
