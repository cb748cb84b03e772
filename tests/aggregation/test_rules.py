"""Aggregation rules are a registry: the built-in ones by name, and a user's rule (here a per-teacher
weighting with state) added as one class and used by a run without touching the runtime."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from raydfml.aggregation import RULES, Rule, RuleContext, build_rule, register_rule
from raydfml.errors import UserError
from raydfml.records import TeacherRecord


def _records(grads, losses):
    return [TeacherRecord(teacher=i, grad=np.asarray(g, dtype=np.float32), loss=l)
            for i, (g, l) in enumerate(zip(grads, losses))]


def _cfg(**over):
    from raydfml.config import resolve

    return resolve("mr", "deepinv", "smoke", over)


def test_builtin_rules_are_registered_with_what_they_need():
    assert {"mean", "align", "igr"} <= set(RULES.names())
    assert build_rule(_cfg()).needs == "meta_grad"
    igr = build_rule(_cfg(**{"aggregate.rule": "igr"}))
    assert igr.needs == "task_grad" and igr.two_pass
    exact = build_rule(_cfg(**{"aggregate.rule": "igr", "igr.form": "exact"}))
    assert exact.needs == "task" and not exact.two_pass
    assert build_rule(_cfg(**{"aggregate.rule": "align"})).needs == "task"


def test_mean_rule_is_the_plain_average():
    grads, _ = build_rule(_cfg())(_records([[1, 2, 3], [3, 4, 5]], [0.1, 0.2]), None)
    assert torch.equal(grads, torch.tensor([2.0, 3.0, 4.0]))


def test_igr_displacement_moves_each_teacher_against_its_deviation():
    igr = build_rule(_cfg(**{"aggregate.rule": "igr", "igr.eta": 0.5}))
    thetas, stats = igr.displace(_records([[1.0, 0.0], [3.0, 0.0]], [0, 0]), torch.zeros(2))
    # g_bar = (2, 0): teacher 0 (below the mean) moves by -0.5 * (2 - 1), teacher 1 by -0.5 * (2 - 3)
    assert torch.allclose(thetas[0], torch.tensor([-0.5, 0.0])) and torch.allclose(thetas[1], torch.tensor([0.5, 0.0]))
    assert stats["igr/spread"] == pytest.approx(0.5)


def test_unknown_rule_and_bad_options_are_one_line_errors():
    with pytest.raises(UserError, match="aggregate.rule 'nope'.*mean"):
        _cfg(**{"aggregate.rule": "nope"})
    with pytest.raises(UserError, match="igr.form"):
        _cfg(**{"aggregate.rule": "igr", "igr.form": "third_order"})
    with pytest.raises(UserError, match="now called 'igr'"):
        _cfg(**{"aggregate.rule": "tgr"})
    with pytest.raises(ValueError, match="already registered"):
        register_rule("mean")(lambda records, ctx: None)


@dataclass
class LossWeightsConfig:
    temperature: float = 1.0


class LossWeighted(Rule):
    """A per-teacher weighting rule: weights softmax(-loss / T), and the running count of updates as state."""
    Config = LossWeightsConfig
    needs = "meta_grad"

    def __init__(self, options=None, cfg=None):
        super().__init__(options or LossWeightsConfig(), cfg)
        self.updates = 0

    def weights(self, records) -> torch.Tensor:
        return torch.softmax(-torch.tensor([r.loss for r in records]) / self.options.temperature, 0)

    def __call__(self, records, ctx):
        self.updates += 1
        w = self.weights(records)
        grads = torch.stack([torch.from_numpy(np.asarray(r.grad)) for r in records])
        return (w[:, None] * grads).sum(0), {"weights/max": float(w.max())}

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = int(state["updates"])


@pytest.fixture
def loss_weighted():
    register_rule("loss_weighted")(LossWeighted)
    yield "loss_weighted"
    RULES.unregister("loss_weighted")


def test_a_weighting_rule_weights_the_lower_loss_teacher_more(loss_weighted):
    rule = build_rule(_cfg(**{"aggregate.rule": loss_weighted, "loss_weighted.temperature": 0.5}))
    grads, stats = rule(_records([[1.0, 0.0], [0.0, 1.0]], [0.1, 1.1]), None)
    w0 = 1 / (1 + math.exp(-2.0))
    assert torch.allclose(grads, torch.tensor([w0, 1 - w0])) and stats["weights/max"] == pytest.approx(w0)


@pytest.mark.e2e
def test_a_run_with_a_user_rule_checkpoints_and_resumes_its_state(loss_weighted, smoke_root, tmp_path):
    from raydfml.config import resolve
    from raydfml.experiment import run_experiment
    from raydfml.runtime.meta_learner import MetaLearner

    cfg = resolve("mr", "deepinv", "smoke", {"data.data_root": str(smoke_root), "runtime.workers": 0,
                                              "aggregate.rule": loss_weighted})
    cfg.out = str(tmp_path / "run")
    run_experiment(cfg, progress=False)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["meta"]
    assert state["rule"] == {"updates": cfg.train.rounds}          # one per-teacher step per round
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss_weighted"] == {"temperature": 1.0}
    import pandas as pd

    assert pd.read_csv(tmp_path / "run" / "metrics.csv")["weights/max"].between(0.5, 1.0).all()
    ml = MetaLearner(cfg.to_dict(), [0], device="cpu", load_val=False)
    ml.load_state_dict(state)
    assert ml.rule.updates == cfg.train.rounds


def test_rule_context_is_what_a_rule_may_use():
    ctx = RuleContext(learner=None, params={"w": torch.zeros(1)}, device=torch.device("cpu"), outer_lr=1e-3)
    assert ctx.outer_lr == 1e-3 and set(ctx.params) == {"w"}
