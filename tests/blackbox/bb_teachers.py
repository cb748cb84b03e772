"""A tiny white-box teacher for the black-box tests: a conv4 trained in about a second on 16-px
"square" images (imported by name, as tests/synthesis/synth_blobs.py: a unique module name cannot
collide with another folder's helpers)."""
from __future__ import annotations

import torch

from blob_teachers import fit_conv4

SIZE = 16
WAY = 5
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def square_images(n_per_class: int, classes: int = WAY, seed: int = 0, size: int = SIZE):
    """Class c = a coloured 5x5 square at its own place (jittered by a pixel) on a random background,
    plus pixel noise: continuous images, so they are off the 8-bit grid like a generator's."""
    g = torch.Generator().manual_seed(seed)
    places = torch.randint(0, size - 5, (classes, 2), generator=torch.Generator().manual_seed(1234))
    colours = torch.rand(classes, 3, generator=torch.Generator().manual_seed(4321))
    xs, ys = [], []
    for c in range(classes):
        img = torch.rand(n_per_class, 3, 1, 1, generator=g).expand(-1, -1, size, size).clone()
        jitter = torch.randint(-1, 2, (n_per_class, 2), generator=g)
        for i in range(n_per_class):
            r, s = (places[c] + jitter[i]).clamp(0, size - 5).tolist()
            img[i, :, r:r + 5, s:s + 5] = colours[c].view(3, 1, 1)
        img = img + torch.randn(img.shape, generator=g) * 0.05
        xs.append(img.clamp(0, 1))
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def train_square_teacher(seed: int = 0, steps: int = 60):
    """(teacher, held-out accuracy): a seeded conv4 in eval mode with its BN running statistics."""
    x, y = square_images(40, seed=seed)
    model = fit_conv4(normalise(x), y, WAY, SIZE, seed=seed, steps=steps, lr=0.005)
    xt, yt = square_images(20, seed=seed + 100)
    with torch.no_grad():
        acc = (model(normalise(xt)).argmax(1) == yt).float().mean().item()
    return model, acc
