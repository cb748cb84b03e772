"""Zero-order gradients through a black-box API and BiDf-MKD's generator recovery."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bb_teachers import MEAN, SIZE, STD, WAY, normalise, square_images
from raydfml.blackbox import BlackBoxAPI, BudgetExceeded, ZeroOrderRecovery, default_mu, zo_gradient, zo_surrogate
from raydfml.blackbox.zeroorder import SEED_MU, api_cross_entropy, chunk_sizes, sphere_directions
from raydfml.errors import UserError
from raydfml.models import Generator

D = 3 * SIZE * SIZE                               # 768 pixels per 16-px image


def true_per_sample_gradient(teacher, x, y):
    """d CE_b / d x_b of the white-box teacher (un-quantised input), the reference for the estimates."""
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(teacher(normalise(x)), y, reduction="sum"), x)[0]


def cosines(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def test_chunks_use_every_direction():
    assert chunk_sizes(100, 5) == [20] * 5
    assert chunk_sizes(10, 3) == [4, 3, 3]          # the seed would use 9 directions and scale by d/10
    assert chunk_sizes(2, 5) == [1, 1]


def test_directions_are_unit_and_seeded():
    u = sphere_directions(3, 4, D, torch.Generator().manual_seed(1), "cpu")
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3, 4))
    assert torch.equal(u, sphere_directions(3, 4, D, torch.Generator().manual_seed(1), "cpu"))


def test_default_mu_moves_a_typical_pixel_by_two_grey_levels():
    for d in (D, 3 * 32 * 32, 3 * 84 * 84):
        assert default_mu(d) / math.sqrt(d) == pytest.approx(2 / 255)
    # The seed's mu (normalised units, x std for pixels) moves a pixel by ~1/160 of a grey level at 32 px.
    assert SEED_MU * 0.27 / math.sqrt(3 * 32 * 32) == pytest.approx(1 / 255 / 160, rel=0.05)


def test_estimate_of_a_linear_loss_is_the_formula_with_the_directions_used():
    """q=10 in 3 chunks (4+3+3): the scale is d/10 over all 10 directions; l(x) = <a, x> makes every
    finite difference exact, so the estimate is (d/q) sum_j <a, u_j> u_j with the same draws."""
    b = 2
    a = torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    x = torch.full((b, 3, SIZE, SIZE), 0.5)          # far from the clamp at 0 and 1

    def linear(images, rows):
        return (images.flatten(1) * a[rows].flatten(1)).sum(1)

    est = zo_gradient(linear, x, q=10, chunks=3, generator=torch.Generator().manual_seed(9))
    assert est.directions == 10 and est.queries == b * 11
    torch.testing.assert_close(est.loss, linear(x, torch.arange(b)))
    g = torch.Generator().manual_seed(9)
    u = torch.cat([sphere_directions(b, k, D, g, "cpu") for k in (4, 3, 3)], dim=1)        # [b, 10, d]
    expected = (D / 10) * torch.einsum("bk,bkd->bd", torch.einsum("bd,bkd->bk", a.flatten(1), u), u)
    torch.testing.assert_close(est.grad.flatten(1), expected, rtol=1e-3, atol=1e-3)


def test_perturbed_images_stay_in_the_valid_range():
    seen = []

    def loss(images, rows):
        seen.append((float(images.min()), float(images.max())))
        return images.flatten(1).sum(1)

    x = torch.stack([torch.zeros(3, SIZE, SIZE), torch.ones(3, SIZE, SIZE)])
    zo_gradient(loss, x, q=6, mu=5.0, chunks=2, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 3 and all(lo >= 0.0 and hi <= 1.0 for lo, hi in seen)


@pytest.mark.parametrize("input_kind", ["float", "uint8"])
def test_estimate_points_along_the_true_gradient(teacher, input_kind):
    """Cosine of the ZO estimate (default mu) with the white-box gradient: about sqrt(q / (q + d)),
    positive for every sample, growing with q. Measured at d = 768, 20 samples (float / uint8 input):
    q=10: 0.086 / 0.082, q=100: 0.303 / 0.291, q=400: 0.520 / 0.504 (sqrt(q/d) 0.11, 0.36, 0.72)."""
    x, y = square_images(4, seed=7)                  # 20 continuous (off the 8-bit grid) images
    truth = true_per_sample_gradient(copy.deepcopy(teacher), x, y)
    api = BlackBoxAPI(teacher, MEAN, STD, input=input_kind)
    loss = api_cross_entropy(api, y)
    means = {}
    for q in (10, 100, 400):
        cos = cosines(zo_gradient(loss, x, q=q, generator=torch.Generator().manual_seed(0)).grad, truth)
        means[q] = float(cos.mean())
        assert (cos > 0).all(), (q, cos)             # sign test: every sample's estimate points uphill
        assert means[q] > 0.5 * math.sqrt(q / D), (q, means[q])
    print(f"\n{input_kind}: d={D} mean cosine", {q: round(c, 3) for q, c in means.items()})
    assert means[10] < means[100] < means[400]
    assert means[100] == pytest.approx(math.sqrt(100 / (100 + D)), abs=0.1)


def test_seed_scale_mu_sees_nothing_through_an_8_bit_api(teacher):
    """The seed's mu moves a pixel by less than half a grey level: for images on the 8-bit grid every
    finite difference is exactly zero; for continuous images only pixels next to a rounding boundary
    flip, by a whole level, and the estimate is mostly quantisation noise. The default mu works."""
    x, y = square_images(4, seed=7)
    on_grid = torch.round(x * 255) / 255
    api = BlackBoxAPI(copy.deepcopy(teacher), MEAN, STD)          # 8-bit input
    loss = api_cross_entropy(api, y)
    seed_mu = SEED_MU * STD[0]                                    # the seed's mu in pixel units
    rng = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    assert torch.count_nonzero(zo_gradient(loss, on_grid, mu=seed_mu, generator=rng()).grad) == 0
    default = zo_gradient(loss, on_grid, generator=rng()).grad
    assert (default.flatten(1).abs().sum(1) > 0).all()

    truth = true_per_sample_gradient(teacher, x, y)
    noisy = float(cosines(zo_gradient(loss, x, mu=seed_mu, generator=rng()).grad, truth).mean())
    good = float(cosines(zo_gradient(loss, x, generator=rng()).grad, truth).mean())
    assert noisy < 0.5 * good, (noisy, good)                      # measured 0.044 vs 0.291


def test_surrogate_backpropagates_the_estimate_through_a_generator(teacher):
    """d surrogate / dx_b = g_b / B; with the true per-sample gradient in place of the estimate, the
    surrogate's gradient w.r.t. a generator's parameters is the mean loss's own gradient (chain rule)."""
    torch.manual_seed(0)
    gen = Generator(nz=8, ngf=4, image_size=SIZE).train()
    z = torch.randn(6, 8)
    y = torch.arange(6) % WAY
    x = torch.rand(6, 3, SIZE, SIZE, requires_grad=True)
    g = torch.randn(6, 3, SIZE, SIZE)
    torch.testing.assert_close(torch.autograd.grad(zo_surrogate(x, g), x)[0], g / 6)

    params = list(gen.parameters())
    images = gen(z)
    direct = torch.autograd.grad(F.cross_entropy(teacher(normalise(images)), y), params, retain_graph=True)
    truth = true_per_sample_gradient(teacher, images.detach(), y)
    via_surrogate = torch.autograd.grad(zo_surrogate(images, truth), params)
    for a, b in zip(direct, via_surrogate):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def smoke_recovery(**kwargs) -> ZeroOrderRecovery:
    """16 px, 4 images per class, q=10: a recovery in a fraction of a second."""
    options = dict(image_size=SIZE, per_class=4, steps=10, q=10, chunks=2, nz=16, ngf=8, lr_generator=1e-2,
                   lr_latent=1e-2, augment="none")
    options.update(kwargs)
    return ZeroOrderRecovery(**options)


def mean_probability_of_labels(api, images, labels):
    return float(api.predict(images.float()).gather(1, labels.view(-1, 1)).mean())


def test_recovery_raises_the_probability_of_the_intended_labels(teacher):
    """Ten ZO steps from the API's probabilities alone. Seeds 0-5 all go from CE ~3.0 to 1.2-1.6 and
    from p(label) 0.20 to 0.38-0.48; seed 0: CE 3.07 -> 1.25, p 0.20 -> 0.44, accuracy 0.45."""
    judge = BlackBoxAPI(copy.deepcopy(teacher), MEAN, STD, input="float")
    first = smoke_recovery(steps=1, keep="last").synthesize(
        BlackBoxAPI(copy.deepcopy(teacher), MEAN, STD), range(WAY), seed=0)      # the first iterate
    api = BlackBoxAPI(teacher, MEAN, STD, classes=range(WAY))
    rec = smoke_recovery().synthesize(api, range(WAY), seed=0)
    assert rec.ce_history[0] == pytest.approx(first.loss)
    assert rec.loss == min(rec.ce_history) and rec.loss < 0.7 * rec.ce_history[0]
    p_first = mean_probability_of_labels(judge, first.images, first.labels)
    p_kept = mean_probability_of_labels(judge, rec.images, rec.labels)
    assert p_kept > p_first + 0.1, (p_first, p_kept)
    assert rec.teacher_acc > 1 / WAY
    assert rec.images.dtype == torch.float16 and rec.images.shape == (WAY * 4, 3, SIZE, SIZE)


def test_recovery_reports_its_queries_and_checks_the_budget_first(teacher):
    recovery = smoke_recovery(steps=2, q=5, chunks=3, augment="crop_flip")
    n = WAY * 4
    needed = 2 * n * (1 + 5) + n
    assert recovery.queries_needed(WAY) == needed
    short = BlackBoxAPI(copy.deepcopy(teacher), MEAN, STD, name="teacher 1", max_images=needed - 1)
    with pytest.raises(BudgetExceeded, match="zero-order recovery"):
        recovery.synthesize(short, range(WAY), seed=0)
    assert short.counts()["calls"] == 0 and short.counts()["images"] == 0

    api = BlackBoxAPI(copy.deepcopy(teacher), MEAN, STD, name="teacher 1", max_images=needed)
    rec = recovery.synthesize(api, range(WAY), seed=0)
    assert rec.queries == needed == api.images
    assert rec.calls == 2 * (1 + 3) + 1 == api.calls
    again = recovery.synthesize(BlackBoxAPI(teacher, MEAN, STD), range(WAY), seed=0)
    assert torch.equal(again.images, rec.images)      # seeded: same seed, same images


def test_recovery_needs_scores_not_labels(teacher):
    api = BlackBoxAPI(teacher, MEAN, STD, output="label")
    with pytest.raises(UserError, match="probabilities or logits"):
        smoke_recovery().synthesize(api, range(WAY), seed=0)
    assert api.calls == 0


def test_boundary_loss_subtracts_the_api_student_distance_where_their_top1_agree(teacher):
    """BiDf-MKD's boundary query loss: CE, minus the L1 distance between the API's and the student's
    answers (probability vectors for a probabilities API) only where both predict the same class."""
    from raydfml.blackbox.zeroorder import api_boundary_loss

    x, y = square_images(3, seed=7)
    api = BlackBoxAPI(teacher, MEAN, STD, name="sq")
    p = api.predict(x)
    agree = p.argmax(1)
    # a student whose top-1 equals the API's on even rows and differs on odd rows
    logits = torch.full_like(p, -2.0)
    for i, c in enumerate(agree.tolist()):
        logits[i, c if i % 2 == 0 else (c + 1) % WAY] = 2.0
    loss = api_boundary_loss(api, y, lambda images: logits[: len(images)], weight=0.5)(x, torch.arange(len(x)))
    ce = -p.gather(1, y.unsqueeze(1)).squeeze(1).clamp_min(1e-12).log()
    l1 = (p - F.softmax(logits, 1)).abs().sum(1)
    expected = torch.where(torch.arange(len(x)) % 2 == 0, ce - 0.5 * l1, ce)
    torch.testing.assert_close(loss, expected)
    labels_only = BlackBoxAPI(copy.deepcopy(teacher), MEAN, STD, name="lbl", output="label")
    with pytest.raises(UserError, match="labels only"):
        api_boundary_loss(labels_only, y, lambda images: logits, 1.0)


def test_recovery_against_a_student_costs_the_same_queries_and_reports_the_apis_labels(teacher):
    """The boundary query set sends exactly the queries of a plain recovery (the student is local), and
    the kept images come back with the API's own top-1 label and confidence."""
    api = BlackBoxAPI(teacher, MEAN, STD, name="sq", output="logits")
    rec = ZeroOrderRecovery(image_size=SIZE, per_class=2, steps=2, q=3, chunks=2, ngf=8, nz=16)
    calls = []

    def student(images):
        calls.append(len(images))
        return torch.zeros(len(images), WAY)

    out = rec.synthesize(api, list(range(WAY)), seed=0, student=student, boundary_weight=1.0)
    assert out.queries == rec.queries_needed(WAY) == api.images
    assert sum(calls) == out.queries - WAY * 2          # the student saw every queried image but the final check
    assert out.predicted.dtype == torch.int64 and out.predicted.shape == (WAY * 2,)
    assert out.teacher_acc == pytest.approx(float((out.predicted == out.labels).float().mean()))
    assert ((out.confidence > 0) & (out.confidence <= 1)).all()
