"""TGR's per-teacher recovery: invert one teacher through a freshly initialised generator.

For each teacher: a new ``Generator`` (seeded init) and learnable latents ``z ~ N(0, I)``, one Adam
over both (betas (0.5, 0.999)), ``steps`` steps of

    ce_weight * CE(T(normalize(augment(G(z)))), y) + bn_weight * BNStats(T)

with ``y = arange(way).repeat_interleave(per_class)``; the lowest-loss iterate's images (before
augmentation) are kept (``keep="best"``, TGR's rule) or the last one (``keep="last"``, FREE's).

The seeds' settings (TGR ``synthesize_pre`` / per-epoch recovery): generator and latent lr 1e-3,
200 steps, 30 images per class (150 per teacher), CE weight 1, BN weight 1, ``crop_flip``
augmentation with one crop/flip shared by the whole batch (bug B15; per image here). The defaults
below differ where a measurement on conv4 teachers said so; see ``GeneratorInversion``.

Optional ``student`` (FREE's adversarial term): on images where student and teacher agree, maximise
KL(teacher || student), so recovered images move to where the student is still wrong. The seeds
fed probabilities to ``F.kl_div`` (bug B4); this uses log-probabilities and ``batchmean``.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import augment as apply_augment, check_augment
from ..errors import UserError
from ..models import Generator
from .base import BNStatsLoss, Recovered, cpu_generator, frozen, make_normalizer, module_device

KEEP = ("best", "last")


def adversarial_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """-mean_b [argmax agree]_b * KL(p_t || p_s): minimising it pushes images to where they disagree."""
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    kl = F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1),
                  reduction="none", log_target=True).sum(1)
    return -(agree * kl).mean()


class GeneratorInversion:
    """Per-teacher generator inversion (TGR's recovery; DeepInversion losses through a generator).

    Defaults (measured on CPU with conv4 teachers; the numbers are in the synthesis README/report):
    ``lr_generator=1e-2`` and ``lr_latent=1e-1`` instead of the seeds' 1e-3/1e-3, which needed about
    four times as many steps to reach the same teacher accuracy; ``steps=200`` and ``per_class=20``
    keep the seeds' cost scale. ``ngf``/``nz`` are the seeds' 64/256.
    """

    def __init__(self, image_size: int = 32, per_class: int = 20, steps: int = 200, lr_generator: float = 1e-2,
                 lr_latent: float = 1e-1, bn_weight: float = 1.0, ce_weight: float = 1.0, augment: str = "crop_flip",
                 nz: int = 256, ngf: int = 64, keep: str = "best", adv_weight: float = 1.0):
        check_augment(augment)
        if keep not in KEEP:
            raise UserError(f"unknown keep {keep!r} (option keep); choose one of {', '.join(KEEP)}")
        if steps < 1 or per_class < 1:
            raise UserError(f"inversion needs steps >= 1 and per_class >= 1 (got steps={steps}, per_class={per_class})")
        if image_size % 4:
            raise UserError(f"the generator needs an image_size divisible by 4, got {image_size}")
        self.image_size, self.per_class, self.steps = image_size, per_class, steps
        self.lr_generator, self.lr_latent = lr_generator, lr_latent
        self.bn_weight, self.ce_weight, self.adv_weight = bn_weight, ce_weight, adv_weight
        self.augment, self.nz, self.ngf, self.keep = augment, nz, ngf, keep

    def _generator(self, seed: int, device: torch.device) -> Generator:
        # Build under a forked RNG so the init is a function of ``seed`` only and the caller's
        # global RNG state is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen = Generator(nz=self.nz, ngf=self.ngf, image_size=self.image_size)
            gen.reset_parameters()
        return gen.to(device).train()

    def synthesize(self, teacher: nn.Module, classes: Sequence[int], mean: Sequence[float], std: Sequence[float],
                   seed: int, student: Callable[[Tensor], Tensor] | None = None) -> Recovered:
        """Recover ``per_class`` images for each of the teacher's classes.

        ``classes`` are the teacher's global class ids in head order (label j <-> classes[j]);
        ``mean``/``std`` the dataset's normalisation; ``student`` (optional) maps normalised images to
        logits and adds the adversarial term. Everything runs on the teacher's device.
        """
        t0 = time.perf_counter()
        classes = tuple(int(c) for c in classes)
        way, device = len(classes), module_device(teacher)
        normalize = make_normalizer(mean, std, device)
        rng = cpu_generator(seed)                      # latents, then every augmentation draw
        gen = self._generator(seed, device)
        z = torch.randn(way * self.per_class, self.nz, generator=rng).to(device).requires_grad_(True)
        y = torch.arange(way, device=device).repeat_interleave(self.per_class)
        params = [*gen.parameters(), z]
        opt = torch.optim.Adam([{"params": list(gen.parameters()), "lr": self.lr_generator},
                                {"params": [z], "lr": self.lr_latent}], betas=(0.5, 0.999))

        kept, kept_loss = None, math.inf
        bn_ctx = BNStatsLoss(teacher) if self.bn_weight else contextlib.nullcontext()
        with frozen(teacher), bn_ctx as bn:
            for _ in range(self.steps):
                x = gen(z)
                xa = normalize(apply_augment(x, self.augment, rng))
                t_logits = teacher(xa)
                loss = self.ce_weight * F.cross_entropy(t_logits, y)
                if bn is not None:
                    loss = loss + self.bn_weight * bn.loss()
                if student is not None and self.adv_weight:
                    loss = loss + self.adv_weight * adversarial_kl(student(xa), t_logits)
                value = float(loss.detach())
                if self.keep == "last" or value < kept_loss:
                    kept, kept_loss = x.detach(), value
                # autograd.grad rather than backward: nothing accumulates in the teacher's or the
                # student's parameters, whatever their requires_grad flags are.
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
            with torch.no_grad():
                acc = float((teacher(normalize(kept)).argmax(1) == y).float().mean())
        return Recovered(images=kept.clamp(0, 1).to("cpu", torch.float16), labels=y.cpu(), classes=classes,
                         teacher_acc=acc, loss=kept_loss, passes=self.steps, seconds=time.perf_counter() - t0)


__all__ = ["GeneratorInversion", "adversarial_kl", "KEEP"]
