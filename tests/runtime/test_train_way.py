"""learner.train_way: ProtoNet meta-trains on wider episodes than it is tested on, in replay and in the
with-data reference alike; the learners with a train.way-output head refuse it."""
import types

import numpy as np
import pytest
import torch

from raydfml.config import resolve
from raydfml.errors import UserError
from raydfml.methods.registry import create_method
from raydfml.runtime.bank import TaskMemoryBank


def _cfg(root=None, method="deepinv", **over):
    base = {"learner.name": "protonet", "runtime.workers": 0}
    if root is not None:
        base["data.data_root"] = str(root)
    return resolve("mr", method, "smoke", {**base, **over})


def _bank() -> TaskMemoryBank:
    bank = TaskMemoryBank(per_class=10)
    for k in range(4):                          # 4 teachers x 3 classes: 12 global classes
        bank.add(torch.rand(30, 3, 4, 4), torch.arange(3).repeat_interleave(10), classes=(3 * k, 3 * k + 1, 3 * k + 2))
    return bank


@pytest.mark.parametrize("train_way,expected", [(0, 5), (8, 8)])
def test_replay_tasks_have_the_episode_ways(train_way, expected):
    cfg = _cfg(**{"learner.train_way": train_way})
    assert cfg.episode_way == expected
    ml = types.SimpleNamespace(bank=_bank(), rng=np.random.default_rng(0))
    x_s, y_s, x_q, y_q, classes = create_method(cfg).sample_task(ml)
    assert len(set(classes)) == expected
    assert sorted(set(y_s.tolist())) == list(range(expected)) == sorted(set(y_q.tolist()))
    assert len(x_s) == expected * cfg.learner.train_shot and len(x_q) == expected * cfg.learner.train_query


def test_with_data_reference_trains_on_the_same_wider_episodes_and_tests_at_train_way(smoke_root):
    from raydfml.baselines import train_with_data
    from raydfml.evaluation import evaluate
    from raydfml.runtime.parts import build_learner_for, build_meta_model, meta_split
    from raydfml.runtime.real import RealEpisodes

    cfg = _cfg(smoke_root, **{"learner.train_way": 7})
    source = RealEpisodes(cfg)
    assert all(len(source.next()[1].classes) == 7 for _ in range(3))
    params = train_with_data(cfg, 2, torch.device("cpu"))
    narrow = train_with_data(_cfg(smoke_root), 2, torch.device("cpu"))
    assert any(not torch.equal(params[n], narrow[n]) for n in params)        # other episodes, other steps
    learner = build_learner_for(cfg, build_meta_model(cfg))
    res = evaluate(learner, params, meta_split(cfg, cfg.data.dataset, "meta_test"), way=cfg.train.way, shot=1,
                   query=3, tasks=4, seed=0)
    assert res.way == 5 and 0.0 <= res.accuracy <= 100.0


def test_purer_draws_its_tasks_at_the_episode_ways():
    cfg = _cfg(method="purer", **{"learner.train_way": 6, "synth.per_class": 4})
    method = create_method(cfg)
    from raydfml.synthesis.purer import PurerDataset

    method.dataset = PurerDataset(classes=range(10), per_class=4, image_size=8)
    ml = types.SimpleNamespace(aug_gen=torch.Generator().manual_seed(0))
    x_s, y_s, x_q, y_q, classes = method.sample_task(ml)
    assert len(set(classes)) == 6 and sorted(set(y_s.tolist())) == list(range(6))


@pytest.mark.parametrize("over,needle", [
    ({"learner.train_way": 1}, "learner.train_way=1: 0 (train.way) or at least 2"),
    ({"learner.train_way": -3}, "learner.train_way=-3"),
    ({"learner.name": "maml", "learner.train_way": 10}, "only learner.name=protonet"),
])
def test_bad_train_way_is_a_one_line_error(over, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        resolve("mr", "deepinv", "smoke", over)


def test_a_pool_covering_fewer_classes_than_the_episode_ways_is_refused_before_training(smoke_root):
    from raydfml.baselines import pool_classes
    from raydfml.experiment import prepare_experiment

    entries = prepare_experiment(_cfg(smoke_root, **{"learner.train_way": 2}), progress=False)
    covered = sum(len(c) for c in pool_classes(_cfg(smoke_root), entries).values())
    with pytest.raises(UserError, match=f"covers only {covered} classes.*--set learner.train_way={covered}"):
        prepare_experiment(_cfg(smoke_root, **{"learner.train_way": covered + 1}), progress=False)
