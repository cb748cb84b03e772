"""Zero-order (ZO) gradients through a black-box API, and BiDf-MKD's generator recovery built on them.

The estimator (randomised smoothing, forward differences; BiDf-MKD's ``--ZO``): for a batch ``x`` of
B images with d = C*H*W pixels each and a per-sample loss l_b computed from API answers only,

    g_b = (d / q) * sum_{j=1..q} [(l_b(x_b + mu * u_bj) - l_b(x_b)) / mu] * u_bj,

with u_bj uniform on the unit sphere of R^d (normal draws, rows normalised), drawn independently for
every sample. It costs B unperturbed queries plus B*q perturbed ones, sent in ``chunks`` batches to
bound memory (BiDf-MKD's ``numsplit``; more chunks = less memory). Perturbed images are clamped to
[0, 1], the range an API accepts, so a pixel at the edge moves less than mu*u says (a small bias at
saturated pixels, which the generator's sigmoid produces).

With q << d the estimate's cosine with the true gradient is about sqrt(q / d) (0.18 for q = 100 at
32 px): each step follows a noisy but positively correlated direction, and Adam averages over steps.

**Smoothing radius, in pixel units.** ``mu`` is the length of the perturbation of the whole image in
[0, 1] pixel units, so a pixel moves by mu*|u_i|, typically mu/sqrt(d). BiDf-MKD's code perturbed
normalised images with mu = 0.005: about 2.4e-5 per pixel at 32 px, some 160 times less than one
8-bit grey level (1/255 = 3.9e-3) and less than half a level even at the largest coordinate
(|u_i| <= 1). Against an API that receives 8-bit images this means: for an image already on the 8-bit
grid (e.g. one read back from a PNG bank) every finite difference is exactly zero, and for a
continuous image only the few pixels that happen to sit within 2.4e-5 of a rounding boundary flip,
each by a full grey level, so the differences are quantisation noise. Here the default is
``mu = grey_levels / 255 * sqrt(d)`` with ``grey_levels = 2``: the typical pixel moves by two grey
levels, so the perturbation survives 8-bit quantisation while the smoothing stays local (0.44 at
32 px, 1.3 at 84 px, in pixel units over the whole image). It also keeps the perturbation far above
TF32's input rounding on GPUs (~5e-4 relative), which the seed's mu was not. Pass ``mu`` to choose
another radius (``SEED_MU`` times the dataset std is the seed's, converted to pixel units).

**Surrogate.** ``zo_surrogate(x, g) = mean_b <flatten(x_b), g_b>`` with g detached: its gradient with
respect to x_b is g_b / B, the ZO estimate of the gradient of the mean loss, and backpropagating it
through the augmentation and the generator is the chain rule with the estimate in place of dl/dx.
Its *value* means nothing (BiDf-MKD selected its "best" images by this value); ``ZeroOrderRecovery``
selects by the real per-sample CE, which the unperturbed queries of the estimator already give.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.augment import augment as apply_augment, check_augment
from ..errors import UserError
from ..models import Generator
from ..synthesis.base import Recovered, cpu_generator
from .api import BlackBoxAPI

GREY_LEVEL = 1.0 / 255.0
DEFAULT_GREY_LEVELS = 2.0       # typical per-pixel perturbation of the default mu, in 8-bit grey levels
SEED_MU = 0.005                 # BiDf-MKD's mu, in *normalised* units (x std for pixel units)
KEEP = ("best", "last")

# (images [m, C, H, W], rows [m]) -> per-image losses [m]; rows[i] is the sample of the batch that
# image i is (a perturbed copy of), so the loss can use that sample's label.
LossFn = Callable[[Tensor, Tensor], Tensor]


def default_mu(d: int, grey_levels: float = DEFAULT_GREY_LEVELS) -> float:
    """The smoothing radius (pixel units) whose typical per-pixel move mu/sqrt(d) is ``grey_levels``/255."""
    return float(grey_levels) * GREY_LEVEL * math.sqrt(d)


def sphere_directions(n: int, k: int, d: int, generator: torch.Generator | None, device) -> Tensor:
    """``[n, k, d]`` float32 directions uniform on the unit sphere of R^d (normal draws, rows normalised).

    Drawn on the generator's device (the global CPU generator when None) and moved to ``device``: a
    CUDA generator keeps the B*q*d draws per step on the GPU, where they belong (BiDf-MKD's code drew
    tens of billions of them per teacher visit on the CPU)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.randn(n, k, d, generator=generator, device=dev, dtype=torch.float32).to(device)
    return u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)


def chunk_sizes(q: int, chunks: int) -> list[int]:
    """Split q directions into min(chunks, q) parts whose sizes differ by at most one; all q are used.

    (BiDf-MKD used q // numsplit directions per chunk, silently dropping the remainder while still
    scaling by d / q.)"""
    parts = max(1, min(int(chunks), int(q)))
    return [q // parts + (1 if i < q % parts else 0) for i in range(parts)]


@dataclass
class ZOEstimate:
    grad: Tensor        # [B, C, H, W] float32, detached: the ZO estimate of dl_b/dx_b
    loss: Tensor        # [B] float32: l_b(x_b) at the unperturbed images (the real loss, not a surrogate)
    directions: int     # directions per sample actually used (the q in the d/q scale)
    queries: int        # images sent to the loss: B * (1 + directions)


def zo_gradient(loss_fn: LossFn, x: Tensor, q: int = 100, mu: float | None = None,
                generator: torch.Generator | None = None, chunks: int = 5) -> ZOEstimate:
    """The forward-difference ZO estimate of each sample's loss gradient at ``x`` (module docstring).

    ``x``: [B, C, H, W] images in [0, 1] (detached here); ``loss_fn``: see ``LossFn``, queries only;
    ``q``: directions per sample; ``mu``: smoothing radius in pixel units (default ``default_mu(d)``);
    ``generator``: seeds the directions; ``chunks``: the number of batches the B*q perturbed
    images are sent in. Everything stays on ``x``'s device."""
    if q < 1 or chunks < 1:
        raise UserError(f"zero-order gradients need q >= 1 and chunks >= 1 (got q={q}, chunks={chunks})")
    x = x.detach().float()
    b, d = x.shape[0], x[0].numel()
    mu = default_mu(d) if mu is None else float(mu)
    if not mu > 0:
        raise UserError(f"zero-order smoothing radius mu must be > 0, got {mu}")
    rows = torch.arange(b, device=x.device)
    loss0 = _checked_losses(loss_fn(x, rows), b)
    flat = x.reshape(b, d)
    grad = torch.zeros(b, d, device=x.device, dtype=torch.float32)
    sizes = chunk_sizes(q, chunks)
    for k in sizes:
        u = sphere_directions(b, k, d, generator, x.device)                 # [B, k, d]
        perturbed = (flat.unsqueeze(1) + mu * u).clamp(0.0, 1.0).reshape(b * k, *x.shape[1:])
        losses = _checked_losses(loss_fn(perturbed, rows.repeat_interleave(k)), b * k).view(b, k)
        slopes = (losses - loss0.unsqueeze(1)) / mu                          # directional derivatives
        grad += torch.einsum("bk,bkd->bd", slopes, u)
    used = sum(sizes)
    grad *= d / used
    return ZOEstimate(grad=grad.view_as(x), loss=loss0, directions=used, queries=b * (1 + used))


def _checked_losses(losses: Tensor, n: int) -> Tensor:
    if losses.shape != (n,):
        raise ValueError(f"a zero-order loss_fn must return one loss per image, shape ({n},); got {tuple(losses.shape)}")
    return losses.detach().float()


def zo_surrogate(x: Tensor, grad: Tensor) -> Tensor:
    """``mean_b <flatten(x_b), grad_b>`` with ``grad`` detached: backpropagating it applies the chain rule
    with the ZO estimate as dl/dx. Use it for gradients only; its value is not a loss."""
    return (x.flatten(1) * grad.detach().flatten(1).to(x.dtype)).sum(1).mean()


def api_cross_entropy(api: BlackBoxAPI, targets: Tensor) -> LossFn:
    """The per-sample CE against ``targets`` (labels of the batch's samples) from the API's answers.

    From probabilities it is ``-log p_y`` (clamped at 1e-12, so a saturated answer gives a finite
    loss); from logits, the usual CE. A label-only API gives no loss to differentiate."""
    if api.output not in ("probs", "logits"):
        raise UserError(f"zero-order recovery needs an API that returns probabilities or logits; API {api.name!r} "
                        f"returns {api.output!r}")

    def loss(images: Tensor, rows: Tensor) -> Tensor:
        out = api.predict(images)
        y = targets[rows].to(out.device)
        if api.output == "logits":
            return F.cross_entropy(out, y, reduction="none")
        return -out.gather(1, y.unsqueeze(1)).squeeze(1).clamp_min(1e-12).log()

    return loss


def api_boundary_loss(api: BlackBoxAPI, targets: Tensor, student: Callable[[Tensor], Tensor],
                      weight: float = 1.0) -> LossFn:
    """BiDf-MKD's "boundary" loss for a query set: the CE against ``targets`` minus ``weight`` times the
    L1 distance between the API's and the student's answers, counted only where both predict the same
    class. Minimising it seeks images the API labels as intended on which the (adapted) student agrees
    in its top-1 but disagrees as much as possible in its scores, i.e. images near the student's boundary.

    ``student``: [0, 1] images -> student logits (a white-box function owned by the caller: the
    meta-model at its adapted parameters). Unlike the original, which evaluated the student once at
    the unperturbed images and reused that answer for every perturbation (so the finite differences
    saw only the API's half of the term), the student is evaluated on every queried batch, so each
    difference measures the whole loss. The original took the L1 on raw logits; an API that returns
    only probabilities has none, so there the distance is between probability vectors (the API's and
    the student's softmax), which also keeps the term on the CE's scale."""
    if api.output == "label":
        raise UserError(f"the boundary query set needs an API that returns probabilities or logits; API {api.name!r} "
                        "returns labels only")

    def loss(images: Tensor, rows: Tensor) -> Tensor:
        out = api.predict(images)
        y = targets[rows].to(out.device)
        if api.output == "logits":
            base = F.cross_entropy(out, y, reduction="none")
        else:
            base = -out.gather(1, y.unsqueeze(1)).squeeze(1).clamp_min(1e-12).log()
        with torch.no_grad():
            s = student(images.to(out.device)).float()
        s = s if api.output == "logits" else F.softmax(s, dim=1)
        same = (out.argmax(1) == s.argmax(1)).float()
        return base - float(weight) * (out - s).abs().sum(1) * same

    return loss


def direction_seed(seed: int) -> int:
    """A seed for the direction generator that differs from ``seed`` (which seeds latents and
    augmentation): two generators with one seed on one device would draw the same normals."""
    return (int(seed) * 0x9E3779B1 + 0x5EED) % (1 << 63)


@dataclass
class ZORecovered(Recovered):
    """``Recovered`` plus what the recovery cost at the API, and the real CE of every step."""
    queries: int = 0                       # images sent to the API by this recovery
    calls: int = 0                         # API calls made by this recovery
    ce_history: tuple[float, ...] = ()     # mean real loss (augmented, unperturbed) at each step's iterate
    predicted: Tensor | None = None        # int64 per kept image: the API's top-1 label for it
    confidence: Tensor | None = None       # float32 per kept image: the API's probability of that label (nan
                                           # when the API answers logits-free labels only)


class ZeroOrderRecovery:
    """BiDf-MKD's black-box data recovery: a fresh generator and latents per call, trained with ZO gradients.

    Per step: x = G(z), x_a = augment(x), the ZO estimate of the per-sample CE at x_a against the
    intended labels (from the API's probabilities or logits), then Adam on {G, z} with the surrogate
    ``zo_surrogate(x_a, g)``. The iterate with the lowest real CE is kept (``keep="best"``; the
    unperturbed queries give it for free) or the last one (``keep="last"``).

    Defaults are BiDf-MKD's (30 images per class, 200 steps, generator and latent lr 1e-3 with betas
    (0.5, 0.999), q = 100, 5 chunks, nz 256, ngf 64, crop + flip augmentation) except the smoothing
    radius (module docstring), the per-image augmentation draws (``data.augment``; the seed shared one
    crop/flip per batch) and the selection rule. One recovery costs steps * N * (1 + q) + N queries
    (N = way * per_class; the last N measure the API's accuracy on the kept images): 3.03 M at the
    defaults, checked against the API's budgets before the first query.

    Random numbers: latents and augmentation come from a CPU generator seeded with ``seed`` (same
    draws on any device); directions from a generator on the recovery's device seeded with
    ``direction_seed(seed)``, so CPU and GPU runs with one seed use different directions.
    """

    def __init__(self, image_size: int = 32, per_class: int = 30, steps: int = 200, lr_generator: float = 1e-3,
                 lr_latent: float = 1e-3, q: int = 100, mu: float | None = None,
                 grey_levels: float = DEFAULT_GREY_LEVELS, chunks: int = 5, augment: str = "crop_flip",
                 nz: int = 256, ngf: int = 64, keep: str = "best"):
        check_augment(augment)
        if keep not in KEEP:
            raise UserError(f"unknown keep {keep!r} (option keep); choose one of {', '.join(KEEP)}")
        if steps < 1 or per_class < 1 or q < 1 or chunks < 1:
            raise UserError("zero-order recovery needs steps, per_class, q and chunks >= 1 (got "
                            f"steps={steps}, per_class={per_class}, q={q}, chunks={chunks})")
        if image_size % 4:
            raise UserError(f"the generator needs an image_size divisible by 4, got {image_size}")
        self.image_size, self.per_class, self.steps = image_size, per_class, steps
        self.lr_generator, self.lr_latent = lr_generator, lr_latent
        self.q, self.chunks, self.grey_levels = q, chunks, grey_levels
        self.mu = default_mu(3 * image_size ** 2, grey_levels) if mu is None else float(mu)
        self.augment, self.nz, self.ngf, self.keep = augment, nz, ngf, keep

    def queries_needed(self, way: int) -> int:
        n = way * self.per_class
        return self.steps * n * (1 + self.q) + n

    def _generator(self, seed: int, device: torch.device) -> Generator:
        # Built under a forked RNG: the init depends on ``seed`` only and the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen = Generator(nz=self.nz, ngf=self.ngf, image_size=self.image_size)
            gen.reset_parameters()
        return gen.to(device).train()       # always in train mode, as the seeds: BN on batch statistics

    def synthesize(self, api: BlackBoxAPI, classes: Sequence[int], seed: int,
                   device: str | torch.device | None = None, student: Callable[[Tensor], Tensor] | None = None,
                   boundary_weight: float = 0.0) -> ZORecovered:
        """Recover ``per_class`` images for each of the API's classes (global ids in output order,
        label j <-> ``classes[j]``), on ``device`` (default: where the API answers).

        With a ``student`` ([0, 1] images -> logits) and ``boundary_weight > 0`` the loss is BiDf-MKD's
        boundary loss (``api_boundary_loss``) instead of the plain CE: the boundary query set."""
        t0 = time.perf_counter()
        classes = tuple(int(c) for c in classes)
        if api.classes is not None and api.classes != classes:
            raise UserError(f"API {api.name!r} classifies classes {api.classes}, recovery asked for {classes}")
        way = len(classes)
        device = api.device if device is None else torch.device(device)
        before = api.counts()
        api.check_budget(self.queries_needed(way), use=f"a zero-order recovery ({self.steps} steps, q={self.q})")

        rng = cpu_generator(seed)                                        # latents, then augmentation
        directions = torch.Generator(device=device).manual_seed(direction_seed(seed))
        gen = self._generator(seed, device)
        z = torch.randn(way * self.per_class, self.nz, generator=rng).to(device).requires_grad_(True)
        y = torch.arange(way, device=device).repeat_interleave(self.per_class)
        if student is not None and boundary_weight > 0:
            ce = api_boundary_loss(api, y, student, boundary_weight)
        else:
            ce = api_cross_entropy(api, y)
        params = [*gen.parameters(), z]
        opt = torch.optim.Adam([{"params": list(gen.parameters()), "lr": self.lr_generator},
                                {"params": [z], "lr": self.lr_latent}], betas=(0.5, 0.999))

        kept, kept_ce, history = None, math.inf, []
        for _ in range(self.steps):
            x = gen(z)
            xa = apply_augment(x, self.augment, rng)
            est = zo_gradient(ce, xa, q=self.q, mu=self.mu, generator=directions, chunks=self.chunks)
            value = float(est.loss.mean())
            history.append(value)
            if self.keep == "last" or value < kept_ce:
                kept, kept_ce = x.detach(), value
            grads = torch.autograd.grad(zo_surrogate(xa, est.grad), params)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()

        answers = api.predict(kept)
        predicted = answers if api.output == "label" else answers.argmax(1)
        if api.output == "probs":
            confidence = answers.max(1).values
        elif api.output == "logits":
            confidence = F.softmax(answers, dim=1).max(1).values
        else:
            confidence = torch.full((len(answers),), math.nan)
        acc = float((predicted.to(device) == y).float().mean())
        after = api.counts()
        return ZORecovered(images=kept.clamp(0, 1).to("cpu", torch.float16), labels=y.cpu(), classes=classes,
                           teacher_acc=acc, loss=kept_ce, passes=self.steps, seconds=time.perf_counter() - t0,
                           queries=after["images"] - before["images"], calls=after["calls"] - before["calls"],
                           ce_history=tuple(history), predicted=predicted.cpu().long(),
                           confidence=confidence.detach().cpu().float())


__all__ = ["DEFAULT_GREY_LEVELS", "GREY_LEVEL", "KEEP", "LossFn", "SEED_MU", "ZOEstimate", "ZORecovered",
           "ZeroOrderRecovery", "api_boundary_loss", "api_cross_entropy", "chunk_sizes", "default_mu", "direction_seed",
           "sphere_directions", "zo_gradient", "zo_surrogate"]
