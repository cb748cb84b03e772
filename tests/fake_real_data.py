"""Tiny stand-ins for real datasets in the seeds' layout, at their native resolutions.

Scenario md on real data mixes 32-px (CIFAR-FS) and 84-px (miniImageNet, CUB) datasets, which the
embedded glyph domains (all 32 px) never exercise. These write a few classes of PNGs into the folder a
real dataset would occupy (``cifar100/``, ``Miniimagenet/``) and the split CSVs the loader reads, so
the real-data path runs end to end without the real data. Each class is a seeded coarse colour
pattern plus per-image noise: learnable by a one-epoch teacher, different across classes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from raydfml.data.filelist import write_folder_split_csvs
from raydfml.data.registry import get_spec

SPLIT_CLASSES = {"meta_train": 6, "meta_val": 5, "meta_test": 5}
IMAGES_PER_CLASS = 24          # >= 5 shots + 15 queries of the meta-test


def write_fake_dataset(root: Path, name: str, seed: int) -> Path:
    """Write dataset ``name`` (a registry name such as ``cifarfs``) at its spec's image size."""
    spec = get_spec(name)
    size = spec.image_size
    rng = np.random.default_rng(seed)
    ddir = Path(root) / spec.folder
    for split, n_classes in SPLIT_CLASSES.items():
        for c in range(n_classes):
            pattern = rng.uniform(0, 255, size=(4, 4, 3))
            base = np.kron(pattern, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
            cdir = ddir / split / f"{split}_class{c:02d}"
            cdir.mkdir(parents=True, exist_ok=True)
            for i in range(IMAGES_PER_CLASS):
                img = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(cdir / f"{i:03d}.png")
    write_folder_split_csvs(ddir)
    return ddir
