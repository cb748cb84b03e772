import pytest
import torch

from raydfml.aggregation.free import FREE_SCALE, reptile_alignment
from raydfml.learners import Task, build_learner
from raydfml.models import build_model


def setup(n_tasks=2, with_teacher=True, seed=0):
    torch.manual_seed(seed)
    learner = build_learner("maml", build_model("conv4", num_classes=5, image_size=16, track_bn_stats=False))
    params = learner.init_params()
    g = torch.Generator().manual_seed(seed + 1)
    tasks = []
    for _ in range(n_tasks):
        xs, xq = torch.randn(5, 3, 16, 16, generator=g), torch.randn(10, 3, 16, 16, generator=g)
        ts, tq = (torch.randn(5, 5, generator=g), torch.randn(10, 5, generator=g)) if with_teacher else (None, None)
        tasks.append(Task(xs, torch.arange(5), xq, torch.arange(5).repeat(2), ts, tq))
    return learner, params, tasks


def manual_steps(learner, params, tasks, lr, opt_cls):
    """θ after one optimiser step per task, in order, on all of each task's images (the definition)."""
    fast = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = opt_cls(list(fast.values()), lr=lr)
    for t in tasks:
        opt.zero_grad()
        x = torch.cat([t.x_support, t.x_query])
        y = torch.cat([t.y_support, t.y_query])
        tl = None if t.t_support is None else torch.cat([t.t_support, t.t_query])
        learner.task_loss_fn(learner.forward(fast, x), y, tl).backward()
        opt.step()
    return {k: v.detach() for k, v in fast.items()}


@pytest.mark.parametrize("with_teacher", [True, False])
def test_one_task_equals_scale_times_displacement(with_teacher):
    learner, params, tasks = setup(1, with_teacher)
    before = {k: v.detach().clone() for k, v in params.items()}
    grads, stats = reptile_alignment(learner, params, tasks, lr=1e-3, scale=40.0)
    after = manual_steps(learner, params, tasks, 1e-3, torch.optim.Adam)
    for k in params:
        assert torch.allclose(grads[k], 40.0 * (before[k] - after[k]), atol=1e-7)
        assert torch.equal(params[k].detach(), before[k])            # θ itself is untouched
        assert params[k].grad is None
    assert len(stats["losses"]) == 1


def test_sequential_order_and_sgd_form():
    learner, params, tasks = setup(3)
    grads, stats = reptile_alignment(learner, params, tasks)
    after = manual_steps(learner, params, tasks, 1e-3, torch.optim.Adam)
    assert all(torch.allclose(grads[k], FREE_SCALE * (params[k].detach() - after[k]), atol=1e-6) for k in params)
    assert len(stats["losses"]) == 3
    reverse, _ = reptile_alignment(learner, params, tasks[::-1])
    assert not all(torch.allclose(grads[k], reverse[k]) for k in params)     # sequential, not a mean
    # SGD with one task: scale * lr * grad L(θ) exactly
    sgd, _ = reptile_alignment(learner, params, tasks[:1], optimizer="sgd", lr=0.1, scale=2.0)
    after = manual_steps(learner, params, tasks[:1], 0.1, torch.optim.SGD)
    assert all(torch.allclose(sgd[k], 2.0 * (params[k].detach() - after[k]), atol=1e-7) for k in params)


def test_bad_arguments():
    learner, params, tasks = setup(1)
    with pytest.raises(ValueError):
        reptile_alignment(learner, params, [])
    with pytest.raises(ValueError):
        reptile_alignment(learner, params, tasks, optimizer="rmsprop")
