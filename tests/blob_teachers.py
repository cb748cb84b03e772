"""The training loop shared by the blob-image teachers of the synthesis and aggregation tests
(imported by name: tests/ is on sys.path because tests/conftest.py sits there)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raydfml.models import build_model


def fit_conv4(xn: torch.Tensor, y: torch.Tensor, num_classes: int, image_size: int, *, seed: int, steps: int,
              lr: float, batch: int = 32) -> torch.nn.Module:
    """A conv4 teacher trained on normalised images ``xn`` for ``steps`` seeded Adam minibatch steps,
    returned in eval mode, frozen, with the BN running statistics of its training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model("conv4", num_classes=num_classes, image_size=image_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xn), (batch,), generator=g)
        loss = F.cross_entropy(model(xn[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval().requires_grad_(False)
