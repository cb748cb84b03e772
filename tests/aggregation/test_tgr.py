import pytest
import torch
import torch.nn.functional as F

from raydfml.aggregation.tgr import igr_exact, igr_first_order, igr_first_order_local, task_losses
from raydfml.learners import Task, build_learner, flatten, unflatten
from raydfml.models import build_model

ETA = 0.3          # large, so that the second-order terms are far above the float64 noise


def linear_problem(n_tasks: int = 3, dim: int = 4, way: int = 3, n: int = 8, seed: int = 0):
    """A tiny softmax-regression meta-model and one CE loss per teacher task (float64)."""
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(way, dim, generator=g, dtype=torch.float64) * 0.5,
              "b": torch.randn(way, generator=g, dtype=torch.float64) * 0.1}
    data = [(torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randint(0, way, (n,), generator=g))
            for _ in range(n_tasks)]

    def make(x, y):
        return lambda p: F.cross_entropy(x @ p["w"].T + p["b"], y)
    return params, [make(x, y) for x, y in data]


def displaced_objective(loss_fns, params, eta):
    """F(θ) = mean_i L_i(θ - η(ḡ(θ) - g_i(θ))), evaluated numerically (gradients by autograd)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    gs = [dict(zip(leaves, torch.autograd.grad(fn(leaves), list(leaves.values())))) for fn in loss_fns]
    g_bar = {k: sum(g[k] for g in gs) / len(gs) for k in leaves}
    with torch.no_grad():
        displaced = [{k: params[k] - eta * (g_bar[k] - g[k]) for k in params} for g in gs]
        return sum(fn(p) for fn, p in zip(loss_fns, displaced)) / len(gs)


def test_exact_igr_equals_finite_differences():
    params, loss_fns = linear_problem()
    got, stats = igr_exact(loss_fns, params, ETA)
    h = 1e-6
    for k, v in params.items():
        for idx in range(v.numel()):
            plus = {kk: vv.clone() for kk, vv in params.items()}
            minus = {kk: vv.clone() for kk, vv in params.items()}
            plus[k].view(-1)[idx] += h
            minus[k].view(-1)[idx] -= h
            fd = (displaced_objective(loss_fns, plus, ETA) - displaced_objective(loss_fns, minus, ETA)) / (2 * h)
            assert got[k].view(-1)[idx].item() == pytest.approx(fd.item(), abs=1e-8)
    assert stats["loss"] == pytest.approx(float(displaced_objective(loss_fns, params, ETA)), abs=1e-12)


def test_exact_igr_differs_from_first_order_only_at_second_order():
    params, loss_fns = linear_problem(seed=1)
    exact, _ = igr_exact(loss_fns, params, ETA)
    first, _ = igr_first_order_local(loss_fns, params, ETA)
    assert not torch.allclose(exact["w"], first["w"], atol=1e-6)        # the Hessian terms are there
    plain = {k: sum(torch.func.grad(fn)(params)[k] for fn in loss_fns) / 3 for k in params}
    e0, _ = igr_exact(loss_fns, params, 0.0)                              # η = 0: the plain mean gradient
    f0, _ = igr_first_order_local(loss_fns, params, 0.0)
    assert all(torch.allclose(e0[k], plain[k]) and torch.allclose(f0[k], plain[k]) for k in params)
    gap_big = max(float((exact[k] - first[k]).abs().max()) for k in params)
    e, _ = igr_exact(loss_fns, params, ETA / 100)                         # the gap shrinks with η
    f, _ = igr_first_order_local(loss_fns, params, ETA / 100)
    assert max(float((e[k] - f[k]).abs().max()) for k in params) < gap_big / 20


def test_spread_statistic():
    params, loss_fns = linear_problem(seed=2)
    gs = [torch.cat([g.reshape(-1) for g in torch.func.grad(fn)(params).values()]) for fn in loss_fns]
    g_bar = torch.stack(gs).mean(0)
    expected = sum(float((g - g_bar).pow(2).sum()) for g in gs) / (2 * len(gs))
    assert igr_exact(loss_fns, params, ETA)[1]["spread"] == pytest.approx(expected)
    assert igr_first_order_local(loss_fns, params, ETA)[1]["spread"] == pytest.approx(expected)


def test_two_phase_first_order_igr_equals_direct_computation():
    """The distributed form with a real learner: flat vectors out and in, as actors would exchange them."""
    torch.manual_seed(0)
    model = build_model("conv4", num_classes=5, image_size=16, track_bn_stats=False)
    learner = build_learner("maml", model)
    params = {k: v.detach() for k, v in learner.init_params().items()}
    names = list(params)
    g = torch.Generator().manual_seed(1)
    tasks = []
    for _ in range(3):
        xs, xq = torch.randn(5, 3, 16, 16, generator=g), torch.randn(10, 3, 16, 16, generator=g)
        tasks.append(Task(xs, torch.arange(5), xq, torch.arange(5).repeat(2),
                          torch.randn(5, 5, generator=g), torch.randn(10, 5, generator=g)))
    losses = task_losses(learner, tasks)
    eta = 0.05

    # phase 1: every "actor" returns its flat g_i at the broadcast θ
    theta = flatten(params, names)

    def actor_grad(i, flat_state):
        p = {k: v.clone().requires_grad_(True) for k, v in unflatten(flat_state, params).items()}
        return flatten(dict(zip(names, torch.autograd.grad(losses[i](p), [p[k] for k in names]))), names)
    g1 = [actor_grad(i, theta) for i in range(3)]
    g_bar, offsets = igr_first_order(g1, eta)
    # phase 2: every actor returns G_i at its displaced state; the update is the mean
    update = torch.stack([actor_grad(i, theta + off) for i, off in enumerate(offsets)]).mean(0)

    # direct: θ_i' = θ - η(ḡ - g_i) from the definition, in dict form
    direct = []
    for i in range(3):
        gi = unflatten(g1[i], params)
        gb = unflatten(torch.stack(g1).mean(0), params)
        displaced = {k: (params[k] - eta * (gb[k] - gi[k])).requires_grad_(True) for k in names}
        direct.append(flatten(dict(zip(names, torch.autograd.grad(losses[i](displaced),
                                                                  [displaced[k] for k in names]))), names))
    assert torch.allclose(g_bar, torch.stack(g1).mean(0))
    assert torch.allclose(update, torch.stack(direct).mean(0), atol=1e-6)
    local, _ = igr_first_order_local(losses, params, eta)
    assert torch.allclose(update, flatten(local, names), atol=1e-6)


def test_igr_first_order_validates_its_input():
    with pytest.raises(ValueError):
        igr_first_order([])
    with pytest.raises(ValueError):
        igr_first_order([torch.zeros(3), torch.zeros(4)])
    g_bar, offsets = igr_first_order([torch.tensor([1.0, 0.0]), torch.tensor([3.0, 2.0])], eta=0.5)
    assert torch.equal(g_bar, torch.tensor([2.0, 1.0]))
    assert torch.equal(offsets[0], torch.tensor([-0.5, -0.5])) and torch.equal(offsets[1], torch.tensor([0.5, 0.5]))
