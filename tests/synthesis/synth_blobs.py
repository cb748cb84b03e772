"""Blob images and a tiny conv4 teacher for the synthesis tests (imported by name: tests/synthesis is
on sys.path under pytest's default import mode, and a unique module name, unlike ``conftest``,
cannot collide with another folder's conftest).
"""
from __future__ import annotations

import torch

from blob_teachers import fit_conv4


MEAN = (0.5, 0.5, 0.5)
STD = (0.29, 0.29, 0.29)
SIZE = 32


def blob_images(n_per_class: int, classes: int = 5, seed: int = 0, size: int = SIZE):
    """Class = where three blobs sit and their (jittered) colour; the background colour is random per
    image, so the BN statistics are broad, as with real images."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(classes, 3, 2, generator=torch.Generator().manual_seed(1234)) * (size - 12) + 6
    colours = torch.rand(classes, 3, generator=torch.Generator().manual_seed(4321))
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    xs, ys = [], []
    for c in range(classes):
        pos = centres[c].unsqueeze(0) + torch.randn(n_per_class, 3, 2, generator=g) * 1.5
        d2 = (yy.view(1, 1, size, size) - pos[..., 0, None, None]) ** 2 + \
             (xx.view(1, 1, size, size) - pos[..., 1, None, None]) ** 2
        blobs = torch.exp(-d2 / (2 * 3.0 ** 2)).amax(1, keepdim=True)          # [n, 1, S, S]
        fg = (colours[c].view(1, 3, 1, 1) + torch.randn(n_per_class, 3, 1, 1, generator=g) * 0.1).clamp(0, 1)
        bg = torch.rand(n_per_class, 3, 1, 1, generator=g)
        img = bg + (fg - bg) * blobs + torch.randn(n_per_class, 3, size, size, generator=g) * 0.05
        xs.append(img.clamp(0, 1))
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def train_blob_teacher(seed: int = 0, steps: int = 80, classes: int = 5, batch: int = 32):
    x, y = blob_images(40, classes, seed=seed)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    xn = (x - mean) / std
    # The running averages from training are what a real teacher has, so they are kept.
    model = fit_conv4(xn, y, classes, SIZE, seed=seed, steps=steps, lr=0.005, batch=batch)
    xt, yt = blob_images(40, classes, seed=seed + 100)
    with torch.no_grad():
        acc = (model((xt - mean) / std).argmax(1) == yt).float().mean().item()
    return model, acc


