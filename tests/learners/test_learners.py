"""Meta-learners: losses, inner loops, meta-gradients (checked against finite differences), registry,
helpers, and a short meta-training run that must beat chance clearly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydfml.errors import UserError
from raydfml.learners import (ANIL, MAML, LEARNERS, ProtoNet, Reptile, Task, apply_grads, build_learner,
                              distill_loss, flatten, mean_grads, unflatten)
from raydfml.models import build_model


# ------------------------------------------------------------------------------------------ fixtures

class Tiny(nn.Module):
    """Two-layer net with the backbone interface (forward_features + classifier), for exact checks."""

    def __init__(self, d: int = 4, h: int = 5, way: int = 3):
        super().__init__()
        self.body = nn.Linear(d, h)
        self.classifier = nn.Linear(h, way)

    def forward_features(self, x):
        return torch.tanh(self.body(x))

    def forward(self, x):
        return self.classifier(self.forward_features(x))


def tiny_setup(seed: int = 0, way: int = 3, shot: int = 2, query: int = 3, d: int = 4):
    torch.manual_seed(seed)
    model = Tiny(d=d, way=way).double()
    g = torch.Generator().manual_seed(seed + 100)
    centres = torch.randn(way, d, generator=g, dtype=torch.float64)
    ys = torch.arange(way).repeat_interleave(shot)
    yq = torch.arange(way).repeat_interleave(query)
    xs = centres[ys] + 0.5 * torch.randn(len(ys), d, generator=g, dtype=torch.float64)
    xq = centres[yq] + 0.5 * torch.randn(len(yq), d, generator=g, dtype=torch.float64)
    return model, Task(xs, ys, xq, yq)


def conv4(width: float = 0.25, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("conv4", num_classes=5, image_size=32, width=width, track_bn_stats=False)


def pattern_task(g: torch.Generator, way: int = 5, shot: int = 1, query: int = 5, noise: float = 3.0,
                 lowres: int = 4) -> Task:
    """Each class a fresh random low-frequency 3x32x32 pattern; images = pattern + heavy pixel noise."""
    pats = F.interpolate(torch.randn(way, 3, lowres, lowres, generator=g), size=32, mode="nearest")

    def draw(k):
        y = torch.arange(way).repeat_interleave(k)
        return pats[y] + noise * torch.randn(len(y), 3, 32, 32, generator=g), y

    xs, ys = draw(shot)
    xq, yq = draw(query)
    return Task(xs, ys, xq, yq)


def fd_meta_grad(learner, params, task, eps=1e-6):
    """Central finite differences of the exact meta-objective L_q(adapt(θ)) (float64)."""
    def objective(p):
        fast = learner.adapt(p, task.x_support, task.y_support, task.t_support)
        if isinstance(learner, ProtoNet):
            logits = learner.logits(fast, task.x_support, task.y_support, task.x_query)
        else:
            logits = learner.forward(fast, task.x_query)
        return float(learner.task_loss_fn(logits, task.y_query, task.t_query).detach())

    base = {n: v.detach().clone() for n, v in params.items()}
    out = {}
    for name, v in base.items():
        g = torch.zeros_like(v)
        flat = g.view(-1)
        for i in range(v.numel()):
            plus = {k: t.clone() for k, t in base.items()}
            minus = {k: t.clone() for k, t in base.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            flat[i] = (objective(plus) - objective(minus)) / (2 * eps)
        out[name] = g
    return out


def assert_grads_close(a, b, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


# ------------------------------------------------------------------------------------------- losses

def test_distill_loss_zero_when_equal_and_matches_manual_kl():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert float(distill_loss(s, s.clone())) == pytest.approx(0.0, abs=1e-12)
    assert float(distill_loss(s, s.clone(), temperature=4.0)) == pytest.approx(0.0, abs=1e-12)

    def manual_kl(s, t):  # mean over the batch of sum_c p_t (log p_t - log p_s)
        p_t = torch.softmax(t, -1)
        return (p_t * (torch.log(p_t) - torch.log_softmax(s, -1))).sum(-1).mean()

    torch.testing.assert_close(distill_loss(s, t), manual_kl(s, t))
    for temp in (2.0, 4.0):
        torch.testing.assert_close(distill_loss(s, t, temperature=temp), temp ** 2 * manual_kl(s / temp, t / temp))
    assert float(distill_loss(s, t)) > 0
    # Not the seeds' B4 loss (kl_div fed probabilities, reduction 'mean').
    b4 = F.kl_div(torch.softmax(s, -1), torch.softmax(t, -1), reduction="sum") / s.numel()
    assert abs(float(distill_loss(s, t)) - float(b4)) > 1e-3


def test_distill_loss_gradient_does_not_reach_teacher():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    distill_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


def test_task_loss_combines_kd_and_ce():
    model, _ = tiny_setup()
    learner = MAML(model, kd_weight=0.7, ce_weight=0.3, temperature=2.0)
    logits = torch.randn(6, 3, dtype=torch.float64)
    t = torch.randn(6, 3, dtype=torch.float64)
    y = t.argmax(-1)
    torch.testing.assert_close(learner.task_loss_fn(logits, y), F.cross_entropy(logits, y))
    torch.testing.assert_close(learner.task_loss_fn(logits, y, t),
                               0.7 * distill_loss(logits, t, 2.0) + 0.3 * F.cross_entropy(logits, y))


# --------------------------------------------------------------------------------------------- MAML

def test_maml_adapt_reduces_support_loss_and_leaves_params_alone():
    learner = MAML(conv4(), inner_lr=0.1, inner_steps=5)
    params = learner.init_params()
    before = {n: v.detach().clone() for n, v in params.items()}
    task = pattern_task(torch.Generator().manual_seed(0), shot=2, noise=1.0)
    with torch.no_grad():
        loss0 = float(F.cross_entropy(learner.forward(params, task.x_support), task.y_support))
    fast = learner.adapt(params, task.x_support, task.y_support)
    with torch.no_grad():
        loss1 = float(F.cross_entropy(learner.forward(fast, task.x_support), task.y_support))
    assert loss1 < 0.5 * loss0
    assert fast.keys() == params.keys()
    assert all(not torch.equal(fast[n], params[n]) for n in params)  # MAML adapts everything
    assert all(torch.equal(params[n], before[n]) for n in params)


def test_maml_second_order_matches_finite_differences_and_differs_from_first_order():
    model, task = tiny_setup()
    so = MAML(model, inner_lr=0.5, inner_steps=2, first_order=False)
    fo = MAML(model, inner_lr=0.5, inner_steps=2, first_order=True)
    params = so.init_params()
    g_so, info = so.meta_grads(params, task)
    g_fo, _ = fo.meta_grads(params, task)
    assert set(info) == {"loss", "acc"} and 0.0 <= info["acc"] <= 1.0
    assert_grads_close(g_so, fd_meta_grad(so, params, task))
    diff = (flatten(g_so) - flatten(g_fo)).norm() / flatten(g_so).norm()
    assert diff > 1e-3
    # First order = gradient of the query loss at the adapted parameters, taken w.r.t. them.
    fast = {n: v.detach().requires_grad_() for n, v in fo.adapt(params, task.x_support, task.y_support).items()}
    loss = F.cross_entropy(fo.forward(fast, task.x_query), task.y_query)
    manual = dict(zip(fast, torch.autograd.grad(loss, list(fast.values()))))
    assert_grads_close(g_fo, manual, rtol=1e-10, atol=1e-12)


def test_maml_with_teacher_logits_matches_finite_differences():
    model, task = tiny_setup(seed=3)
    g = torch.Generator().manual_seed(5)
    task.t_support = torch.randn(len(task.y_support), 3, generator=g, dtype=torch.float64)
    task.t_query = torch.randn(len(task.y_query), 3, generator=g, dtype=torch.float64)
    learner = MAML(model, inner_lr=0.3, inner_steps=2, first_order=False, kd_weight=0.5, temperature=2.0)
    params = learner.init_params()
    assert_grads_close(learner.meta_grads(params, task)[0], fd_meta_grad(learner, params, task))
    # kd_weight=0, ce_weight=1 is plain CE.
    ce_only = MAML(model, inner_lr=0.3, inner_steps=2, first_order=False, kd_weight=0.0)
    plain = Task(task.x_support, task.y_support, task.x_query, task.y_query)
    assert_grads_close(ce_only.meta_grads(params, task)[0], ce_only.meta_grads(params, plain)[0],
                       rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [MAML, ANIL])
def test_second_order_runs_on_conv4_and_under_no_grad(cls):
    """Double backward through conv/BN(batch stats)/ReLU/max-pool; callers inside no_grad still work."""
    task = pattern_task(torch.Generator().manual_seed(7))
    so = cls(conv4(), inner_lr=0.1, inner_steps=2, first_order=False)
    fo = cls(conv4(), inner_lr=0.1, inner_steps=2, first_order=True)
    params = so.init_params()
    g_so, _ = so.meta_grads(params, task)
    g_fo, _ = fo.meta_grads(params, task)
    assert torch.isfinite(flatten(g_so)).all()
    assert (flatten(g_so) - flatten(g_fo)).norm() > 1e-3 * flatten(g_so).norm()
    with torch.no_grad():
        again, _ = so.meta_grads(params, task)
    torch.testing.assert_close(flatten(again), flatten(g_so))


@pytest.mark.parametrize("first_order", [True, False])
def test_maml_zero_inner_steps_is_plain_query_gradient(first_order):
    learner = MAML(conv4(), inner_steps=0, first_order=first_order)
    params = learner.init_params()
    task = pattern_task(torch.Generator().manual_seed(1))
    grads, info = learner.meta_grads(params, task)
    model = conv4()  # same seed, same weights as init_params
    loss = F.cross_entropy(model(task.x_query), task.y_query)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad)
    assert info["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)


def test_meta_grads_accepts_detached_params_and_does_not_modify_them():
    learner = MAML(conv4(), inner_steps=1)
    params = {n: v.detach().clone() for n, v in learner.init_params().items()}
    before = {n: v.clone() for n, v in params.items()}
    grads, _ = learner.meta_grads(params, pattern_task(torch.Generator().manual_seed(2)))
    assert all(not g.requires_grad and g.grad_fn is None for g in grads.values())
    assert all(torch.equal(params[n], before[n]) and not params[n].requires_grad for n in params)


def test_predict_keeps_no_graph_and_works_under_no_grad():
    learner = MAML(conv4(), test_inner_steps=3)
    params = learner.init_params()
    task = pattern_task(torch.Generator().manual_seed(3))
    logits = learner.predict(params, task.x_support, task.y_support, task.x_query)
    assert logits.shape == (len(task.y_query), 5) and not logits.requires_grad and logits.grad_fn is None
    assert all(p.grad is None for p in params.values())
    with torch.no_grad():
        again = learner.predict(params, task.x_support, task.y_support, task.x_query)
    torch.testing.assert_close(logits, again)
    # Test-time adaptation actually happens: zero steps give different logits.
    unadapted = learner.predict(params, task.x_support, task.y_support, task.x_query, steps=0)
    assert not torch.allclose(logits, unadapted)


# --------------------------------------------------------------------------------------------- ANIL

def test_anil_adapt_changes_only_the_head():
    learner = ANIL(conv4(), inner_lr=0.1, inner_steps=3)
    params = learner.init_params()
    task = pattern_task(torch.Generator().manual_seed(4))
    fast = learner.adapt(params, task.x_support, task.y_support)
    for n in params:
        if n.startswith("classifier."):
            assert not torch.equal(fast[n], params[n]), n
        else:
            assert fast[n] is params[n], n
    assert learner.adapted_names(params) == ["classifier.weight", "classifier.bias"]
    # Cached-feature inner loop == the generic inner loop over the full forward, head names only.
    generic = MAML._inner_loop(learner, dict(params), learner.adapted_names(params),
                               lambda p: F.cross_entropy(learner.forward(p, task.x_support), task.y_support),
                               3, create_graph=False, track=True)
    for n in params:
        torch.testing.assert_close(fast[n], generic[n])


def test_anil_meta_grads_reach_the_body_and_second_order_matches_finite_differences():
    model, task = tiny_setup(seed=1)
    so = ANIL(model, inner_lr=0.5, inner_steps=2, first_order=False)
    params = so.init_params()
    g_so, _ = so.meta_grads(params, task)
    assert_grads_close(g_so, fd_meta_grad(so, params, task))
    g_fo, _ = ANIL(model, inner_lr=0.5, inner_steps=2).meta_grads(params, task)
    assert flatten(g_fo, ["body.weight", "body.bias"]).norm() > 0
    assert not torch.allclose(g_fo["body.weight"], g_so["body.weight"])


def test_anil_predict_matches_head_only_finetuning():
    learner = ANIL(conv4(), inner_lr=0.1, test_inner_steps=4)
    params = learner.init_params()
    task = pattern_task(torch.Generator().manual_seed(5))
    logits = learner.predict(params, task.x_support, task.y_support, task.x_query)
    fast = learner.adapt(params, task.x_support, task.y_support, steps=4)
    torch.testing.assert_close(logits, learner.forward(fast, task.x_query).detach())


# ----------------------------------------------------------------------------------------- ProtoNet

@pytest.mark.parametrize("shot", [1, 3])
def test_protonet_classifies_support_points_as_their_own_class(shot):
    learner = ProtoNet(conv4())
    params = learner.init_params()
    g = torch.Generator().manual_seed(6)
    task = pattern_task(g, shot=shot, noise=0.3)
    logits = learner.predict(params, task.x_support, task.y_support, task.x_support)
    assert logits.shape == (5 * shot, 5)
    assert torch.equal(logits.argmax(-1), task.y_support)
    if shot == 1:  # each point is its own prototype: distance exactly zero
        assert torch.all(logits.max(-1).values.abs() < 1e-4)
    assert learner.adapt(params, task.x_support, task.y_support) == params


def test_protonet_meta_grads_match_finite_differences_and_ignore_the_head():
    model, task = tiny_setup(seed=2)
    learner = ProtoNet(model)
    params = learner.init_params()
    grads, info = learner.meta_grads(params, task)
    assert_grads_close(grads, fd_meta_grad(learner, params, task))
    assert torch.count_nonzero(grads["classifier.weight"]) == 0
    assert 0.0 <= info["acc"] <= 1.0


# ------------------------------------------------------------------------------------------ Reptile

def test_reptile_meta_grads_are_params_minus_adapted():
    model, task = tiny_setup(seed=4)
    learner = Reptile(model, inner_lr=0.2, inner_steps=3)
    params = learner.init_params()
    grads, info = learner.meta_grads(params, task)
    # Independent inner loop: plain SGD with torch.func.grad.
    names = list(params)

    def support_loss(p):
        return F.cross_entropy(torch.func.functional_call(model, p, (task.x_support,)), task.y_support)

    fast = {n: v.detach().clone() for n, v in params.items()}
    for _ in range(3):
        g = torch.func.grad(support_loss)(fast)
        fast = {n: fast[n] - 0.2 * g[n] for n in names}
    for n in names:
        torch.testing.assert_close(grads[n], params[n].detach() - fast[n])
    # An outer SGD step of lr 1 lands exactly on the adapted parameters.
    opt = torch.optim.SGD(params.values(), lr=1.0)
    apply_grads(opt, params, grads)
    for n in names:
        torch.testing.assert_close(params[n].detach(), fast[n])
    assert set(info) == {"loss", "acc"}


# ------------------------------------------------------------------------------- registry, helpers

def test_build_learner_registry_and_errors():
    model = conv4()
    for name, cls in LEARNERS.items():
        assert type(build_learner(name, model, inner_steps=2)) is cls
    assert set(LEARNERS) == {"maml", "anil", "protonet", "reptile"}
    assert build_learner("MAML", model, first_order=False).first_order is False
    with pytest.raises(UserError, match="unknown learner 'nope'"):
        build_learner("nope", model)
    with pytest.raises(UserError, match="inner_stepz"):
        build_learner("maml", model, inner_stepz=3)
    with pytest.raises(UserError, match="inner_lr"):
        build_learner("maml", model, inner_lr=0)
    with pytest.raises(UserError, match="inner_steps"):
        build_learner("maml", model, inner_steps=-1)
    with pytest.raises(ValueError, match="track_bn_stats=False"):
        build_learner("maml", build_model("conv4", width=0.25, track_bn_stats=True))


def test_flatten_unflatten_mean_and_apply_grads():
    learner = MAML(conv4())
    params = learner.init_params()
    names = list(params)
    vec = flatten(params, names)
    assert vec.dim() == 1 and vec.numel() == sum(p.numel() for p in params.values())
    back = unflatten(vec, params)
    assert list(back) == names and all(torch.equal(back[n], params[n].detach()) for n in names)
    with pytest.raises(ValueError):
        unflatten(vec[:-1], params)

    g1 = {n: torch.ones_like(p) for n, p in params.items()}
    g2 = {n: 3 * torch.ones_like(p) for n, p in params.items()}
    assert all(torch.all(v == 2) for v in mean_grads([g1, g2]).values())
    assert all(torch.all(v == 2.5) for v in mean_grads([g1, g2], weights=[1, 3]).values())

    before = {n: v.detach().clone() for n, v in params.items()}
    opt = torch.optim.SGD(params.values(), lr=0.5)
    apply_grads(opt, params, g2)
    apply_grads(opt, params, g2)  # overwritten, not accumulated
    for n in names:
        torch.testing.assert_close(params[n].detach(), before[n] - 3.0)
    with pytest.raises(KeyError):
        apply_grads(opt, params, {"nope": torch.zeros(1)})


# --------------------------------------------------------------------------------- meta-training

def test_first_order_maml_meta_training_beats_chance():
    """100 Adam steps of FOMAML on fresh 5-way 1-shot pattern tasks. Noise is heavy (std 3 on unit
    patterns), so the untrained network adapted on the support is near chance (0.2); meta-training
    must learn to denoise (the patterns are low-frequency) to get well above it."""
    torch.manual_seed(0)
    learner = build_learner("maml", conv4(width=0.25, seed=0), inner_lr=0.1, inner_steps=3, test_inner_steps=3)
    params = learner.init_params()
    evals = [pattern_task(torch.Generator().manual_seed(10_000 + i)) for i in range(20)]

    def evaluate():
        return sum(learner.accuracy(params, t) for t in evals) / len(evals)

    before = evaluate()
    opt = torch.optim.Adam(params.values(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        grads, info = learner.meta_grads(params, pattern_task(g))
        apply_grads(opt, params, grads)
    after = evaluate()
    print(f"FOMAML pattern tasks: accuracy {before:.3f} -> {after:.3f}")
    assert before < 0.45, before
    assert after > 0.6 and after - before > 0.25, (before, after)


# ------------------------------------------------- distilling a teacher's task, ProtoNet's BN batch

def _with_teacher(task: Task, seed: int = 9) -> Task:
    g = torch.Generator().manual_seed(seed)
    way = int(task.y_support.max()) + 1
    return Task(task.x_support, task.y_support, task.x_query, task.y_query,
                torch.randn(len(task.y_support), way, generator=g, dtype=task.x_support.dtype),
                torch.randn(len(task.y_query), way, generator=g, dtype=task.x_query.dtype))


def test_protonet_distils_a_teachers_task_through_its_prototypes_not_the_unused_head():
    """distill_via=learner: the task loss is KD + CE on the query with the support's prototypes, so the
    head gets no gradient; distill_via=head: through the head (what ProtoNet never uses at test time)."""
    model, task = tiny_setup(seed=3)
    task = _with_teacher(task)
    native, head = ProtoNet(model), ProtoNet(model, distill_via="head")
    params = native.init_params()
    expected = native.task_loss_fn(native.logits(params, task.x_support, task.y_support, task.x_query),
                                   task.y_query, task.t_query)
    assert torch.allclose(native.task_loss(params, task), expected)
    for learner, head_grad in ((native, False), (head, True)):
        p = learner._leaves(params)
        g = torch.autograd.grad(learner.task_loss(p, task), [p["classifier.weight"]], allow_unused=True)[0]
        assert (g is not None and bool(g.abs().sum() > 0)) == head_grad
    # MAML-family learners distil through the head either way (their test-time rule uses it)
    assert torch.allclose(MAML(model).task_loss(params, task), MAML(model).whole_task_loss(params, task))


def test_outer_loss_is_the_learners_meta_objective_and_reaches_the_images():
    model, task = tiny_setup(seed=5)
    x_q = task.x_query.clone().requires_grad_(True)
    task = Task(task.x_support, task.y_support, x_q, task.y_query)
    proto = ProtoNet(model)
    params = proto.init_params()
    loss = proto.outer_loss(params, task)
    assert torch.allclose(loss, F.cross_entropy(proto.logits(params, task.x_support, task.y_support, x_q),
                                                task.y_query))
    assert torch.autograd.grad(loss, x_q)[0].abs().sum() > 0
    maml = MAML(model, inner_steps=1)
    fast = maml.adapt(params, task.x_support, task.y_support, create_graph=True)
    assert torch.allclose(maml.outer_loss(params, task), F.cross_entropy(maml.forward(fast, x_q), task.y_query))


def test_protonet_joint_bn_normalises_support_and_query_as_one_batch():
    from raydfml.learners import proto_logits, prototypes

    learner, joint = ProtoNet(conv4()), ProtoNet(conv4(), joint_bn=True)
    params = learner.init_params()
    task = pattern_task(torch.Generator().manual_seed(2), shot=1, query=5)
    feats = learner.features(params, torch.cat([task.x_support, task.x_query]))
    expected = proto_logits(feats[5:], prototypes(feats[:5], task.y_support))
    assert torch.allclose(joint.logits(params, task.x_support, task.y_support, task.x_query), expected, atol=1e-5)
    separate = learner.logits(params, task.x_support, task.y_support, task.x_query)
    assert not torch.allclose(separate, expected, atol=1e-3)        # 5 support images' own statistics differ


def test_protonet_cosine_metric_scales_the_cosine_to_normalised_prototypes():
    model, task = tiny_setup(seed=3, shot=3)
    learner = ProtoNet(model, metric="cosine", metric_scale=7.0)
    params = learner.init_params()
    f_s, f_q = learner.features(params, task.x_support), learner.features(params, task.x_query)
    unit = f_s / f_s.norm(dim=1, keepdim=True)
    protos = torch.stack([unit[task.y_support == c].mean(0) for c in range(3)])
    expected = 7.0 * torch.stack([torch.cosine_similarity(q[None], protos, dim=1) for q in f_q])
    got = learner.logits(params, task.x_support, task.y_support, task.x_query)
    assert torch.allclose(got, expected)
    assert got.abs().max() <= 7.0 + 1e-9
    # the Euclidean default is a different rule on the same features
    assert not torch.allclose(ProtoNet(model).logits(params, task.x_support, task.y_support, task.x_query), got)
    assert_grads_close(learner.meta_grads(params, task)[0], fd_meta_grad(learner, params, task))


def test_protonet_metric_options_are_checked():
    with pytest.raises(UserError, match="metric"):
        ProtoNet(conv4(), metric="manhattan")
    with pytest.raises(UserError, match="metric_scale"):
        ProtoNet(conv4(), metric="cosine", metric_scale=0)
    from raydfml.config import resolve

    assert resolve("ma", "free", "quick", {"learner.metric": "cosine"}).learner.metric == "cosine"
    with pytest.raises(UserError, match="learner.metric='cosine': only learner.name=protonet"):
        resolve("mr", "deepinv", "smoke", {"learner.metric": "cosine"})          # smoke's learner is MAML
