"""PURER in the engine: the dataset's Adam steps per round, and the hardening through the learner."""
from __future__ import annotations

import torch
from method_rounds import method_cfg, one_round, pool_classes


def test_purer_takes_data_steps_adam_steps_of_its_dataset_per_round(ma_pool, tmp_path):
    from raydfml.runtime.executor import InProcessExecutor

    root, entries = ma_pool
    for steps in (1, 3):
        cfg = method_cfg(root, "purer", 0, **{"purer.data_steps": steps})
        ex = InProcessExecutor(cfg, entries, pool_classes(entries))
        dataset = ex.meta.method.dataset
        before = dataset.images().clone()
        one_round(cfg, ex, entries, 0, tmp_path, teachers=[0, 5])
        state = dataset.optimizer.state[dataset.logits]
        assert int(state["step"]) == steps and not torch.equal(dataset.images(), before)


def test_purer_hardening_maximises_the_learners_own_query_loss(ma_pool):
    """The adversarial closure is minus the learner's outer loss (ProtoNet: through its prototypes),
    differentiable w.r.t. the synthetic images."""
    from raydfml.runtime.meta_learner import MetaLearner

    root, entries = ma_pool
    cfg = method_cfg(root, "purer", 0, **{"learner.name": "protonet"})
    ml = MetaLearner(cfg.to_dict(), pool_classes(entries), device="cpu", load_val=False)
    images = torch.sigmoid(ml.method.dataset.logits)
    loss = ml.method._adversarial_loss(ml, images)
    grad, = torch.autograd.grad(loss, ml.method.dataset.logits)
    assert loss.item() < 0 and grad.abs().sum() > 0
