"""Per-image, differentiable augmentation of float image batches in [0, 1] pixel space.

Used twice: on synthetic images fed to the meta-learner (where the glyph probe found colour
augmentation to be worth ~25 points) and inside inversion, which backpropagates through it.

Every image gets its own random draw. The seeds applied torchvision transforms to a whole batch
tensor, so one crop/flip was shared by every image in the batch (reference bug B15).

Geometric moves are index gathers (``Tensor.gather``), so they are differentiable w.r.t. the pixels
and vectorised over the batch; there is no Python loop over images.

Random numbers are drawn from ``generator`` on *its* device (a CPU generator by default) and then
moved to the images' device, so the same seed gives the same augmentation on CPU and GPU.

Kinds (the option is called ``augment``):

- ``colour``: the probe's prior for glyph images (colour carries no class information there):
  random channel permutation, inversion ``1 - x`` with p=0.5, per-channel gain in [0.6, 1.4] and
  offset in [-0.2, 0.2] (clamped back to [0, 1]), then a circular shift of up to +-2 px.
  It is a prior about the rendering and would be a different (wrong) prior for natural images.
- ``crop_flip``: the natural-image prior of FREE/TGR: zero-pad 4, random crop back to the input
  size, horizontal flip with p=0.5 (torchvision's ``RandomCrop(pad=4)`` + ``RandomHorizontalFlip``).
- ``crop``: the same crop without the flip, for images whose mirror image is another class (letters:
  a flipped ``b`` is a ``d``, a flipped ``R`` is no letter of the set).
- ``shift``: circular shift of up to +-2 px in each direction (PURER's jitter, per image here).
- ``none``: identity.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError

AUGMENTATIONS = ("colour", "crop_flip", "crop", "shift", "none")

MAX_SHIFT = 2          # px, the seeds' jitter range (PURER's roll)
CROP_PAD = 4           # px, torchvision RandomCrop(padding=4) as in FREE/TGR
GAIN = (0.6, 1.4)
OFFSET = (-0.2, 0.2)


def check_augment(kind: str) -> str:
    if kind not in AUGMENTATIONS:
        raise UserError(f"unknown augment {kind!r} (option augment); choose one of {', '.join(AUGMENTATIONS)}")
    return kind


def _uniform(shape, low: float, high: float, generator: torch.Generator | None, device) -> Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    return (torch.rand(shape, generator=generator, device=dev) * (high - low) + low).to(device)


def _randint(shape, low: int, high: int, generator: torch.Generator | None, device) -> Tensor:
    """Integers in [low, high] inclusive."""
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(low, high + 1, shape, generator=generator, device=dev).to(device)


def _gather_hw(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """out[b, c, i, j] = x[b, c, rows[b, i], cols[b, j]] for per-image index vectors."""
    b, c, h, w = x.shape
    ho, wo = rows.shape[1], cols.shape[1]
    x = x.gather(2, rows.view(b, 1, ho, 1).expand(b, c, ho, w))
    return x.gather(3, cols.view(b, 1, 1, wo).expand(b, c, ho, wo))


def _shift(x: Tensor, generator: torch.Generator | None, max_shift: int = MAX_SHIFT) -> Tensor:
    """Circular shift (``torch.roll``) by its own (dy, dx) in [-max_shift, max_shift] per image."""
    b, _, h, w = x.shape
    d = _randint((b, 2), -max_shift, max_shift, generator, x.device)
    rows = (torch.arange(h, device=x.device).view(1, h) - d[:, :1]) % h
    cols = (torch.arange(w, device=x.device).view(1, w) - d[:, 1:]) % w
    return _gather_hw(x, rows, cols)


def _crop_flip(x: Tensor, generator: torch.Generator | None, pad: int = CROP_PAD, flips: bool = True) -> Tensor:
    b, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))          # zero padding, as torchvision's default
    off = _randint((b, 2), 0, 2 * pad, generator, x.device)
    flip = _uniform((b, 1), 0.0, 1.0, generator, x.device) < 0.5
    if not flips:       # the same draws as crop_flip (the crops match), the flips dropped
        flip = torch.zeros_like(flip)
    rows = off[:, :1] + torch.arange(h, device=x.device).view(1, h)
    base = torch.arange(w, device=x.device).view(1, w)
    cols = off[:, 1:] + torch.where(flip, (w - 1) - base, base)    # flipping the crop = crop of the flip
    return _gather_hw(xp, rows, cols)


def _colour(x: Tensor, generator: torch.Generator | None) -> Tensor:
    b, c = x.shape[:2]
    dev = generator.device if generator is not None else torch.device("cpu")
    perm = torch.rand((b, c), generator=generator, device=dev).argsort(dim=1).to(x.device)
    x = x.gather(1, perm.view(b, c, 1, 1).expand_as(x))
    invert = (_uniform((b, 1, 1, 1), 0.0, 1.0, generator, x.device) < 0.5)
    x = torch.where(invert, 1.0 - x, x)
    gain = _uniform((b, c, 1, 1), *GAIN, generator, x.device)
    offset = _uniform((b, c, 1, 1), *OFFSET, generator, x.device)
    x = (x * gain + offset).clamp(0.0, 1.0)
    return _shift(x, generator)


def augment(x: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """Augment a float batch ``[B, C, H, W]`` in [0, 1]; every image gets its own random draw.

    Same shape out, differentiable w.r.t. ``x``. ``generator`` seeds the draws (default: torch's
    global CPU generator); pass one for reproducible results.
    """
    check_augment(kind)
    if kind == "none":
        return x
    if x.dim() != 4:
        raise ValueError(f"augment expects a [B, C, H, W] batch, got shape {tuple(x.shape)}")
    if kind == "shift":
        return _shift(x, generator)
    if kind == "crop_flip":
        return _crop_flip(x, generator)
    if kind == "crop":
        return _crop_flip(x, generator, flips=False)
    return _colour(x, generator)


__all__ = ["AUGMENTATIONS", "augment", "check_augment"]
