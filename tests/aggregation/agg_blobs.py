"""Tiny teachers on a 10-class synthetic "blob" universe, for the task-space and aggregation tests.

Each class is a fixed arrangement of three Gaussian blobs in a class colour on a random background
(16 px, so everything runs in seconds on one thread). Teachers 0 and 1 know classes 0-4, teachers 2
and 3 know classes 5-9 (different seeds; the second of each pair lists its classes in another head
order, as zoo teachers do). The probe teacher knows a mix (0, 2, 4, 6, 8) and is none of the four.
"""
from __future__ import annotations

import torch

from blob_teachers import fit_conv4


MEAN = (0.5, 0.5, 0.5)
STD = (0.29, 0.29, 0.29)
SIZE = 16
CLASS_SETS = ((0, 1, 2, 3, 4), (3, 0, 4, 1, 2), (5, 6, 7, 8, 9), (8, 6, 9, 5, 7))
PROBE_CLASSES = (0, 2, 4, 6, 8)
TEACHER_SEEDS = (0, 1, 2, 3)


def blob_images(classes, n_per_class: int, seed: int, size: int = SIZE, sigma: float = 2.0, bg_spread: float = 0.3):
    """Images of the given global classes (of a fixed 10-class universe) and their relative labels
    (position in ``classes``). The background is a random grey-ish colour around 0.5 (``bg_spread``
    wide per channel), so the class content, not the background, dominates the image statistics."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(10, 3, 2, generator=torch.Generator().manual_seed(1234)) * (size - 6) + 3
    colours = torch.rand(10, 3, generator=torch.Generator().manual_seed(4321))
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    xs, ys = [], []
    for j, c in enumerate(classes):
        pos = centres[c].unsqueeze(0) + torch.randn(n_per_class, 3, 2, generator=g) * 0.7
        d2 = (yy - pos[..., 0, None, None]) ** 2 + (xx - pos[..., 1, None, None]) ** 2
        blobs = torch.exp(-d2 / (2 * sigma ** 2)).amax(1, keepdim=True)
        fg = (colours[c].view(1, 3, 1, 1) + torch.randn(n_per_class, 3, 1, 1, generator=g) * 0.1).clamp(0, 1)
        bg = 0.5 + (torch.rand(n_per_class, 3, 1, 1, generator=g) - 0.5) * bg_spread
        xs.append((bg + (fg - bg) * blobs + torch.randn(n_per_class, 3, size, size, generator=g) * 0.05).clamp(0, 1))
        ys.append(torch.full((n_per_class,), j))
    return torch.cat(xs), torch.cat(ys)


def normalize(x):
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def train_teacher(classes, seed: int, steps: int = 30, batch: int = 32):
    x, y = blob_images(classes, 30, seed=seed)
    return fit_conv4(normalize(x), y, len(classes), SIZE, seed=seed, steps=steps, lr=0.01, batch=batch)


