"""A user's own dataset given as a folder (``--dataset ./my_data``): what its spec is.

The folder follows the seeds' layout, ``{meta_train,meta_val,meta_test}/<class>/<images>``, with or
without ``split/*.csv`` (written on first load when absent). Grey or colour images of any size: the
working size defaults to the first meta-train image's (within 16-84 px, the seeds' largest), and the
normalisation statistics are computed once from a seeded sample of meta-train images and cached in
``<folder>/.cache/stats.json`` (recomputed when the meta-train listing changes). Nothing here imports
the rest of the data package, so the registry can use it without an import circle.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..utils import atomic_path

SPLITS = ("meta_train", "meta_val", "meta_test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
STATS_SAMPLE = 500           # images decoded for the normalisation statistics
MIN_SIZE, MAX_SIZE = 16, 84


def class_images(split_dir: Path) -> dict[str, list[Path]]:
    """``{class: [images]}`` of one ``meta_*`` folder (hidden entries skipped), sorted."""
    return {c.name: sorted(p for p in c.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith("."))
            for c in sorted(split_dir.iterdir()) if c.is_dir() and not c.name.startswith(".")}


def check_layout(ddir: Path) -> dict[str, dict[str, list[Path]]]:
    """The folder's classes per split; a missing split, a split without classes or an empty class is a
    one-line UserError naming it."""
    if not ddir.is_dir():
        raise UserError(f"--dataset {ddir}: no such folder")
    out = {}
    for split in SPLITS:
        sdir = ddir / split
        if not sdir.is_dir():
            if (ddir / "split" / f"{split}.csv").is_file():
                out[split] = {}               # listed by the seeds' CSV alone (images elsewhere)
                continue
            raise UserError(f"--dataset {ddir}: {split}/ is missing; expected "
                            f"{{{','.join(SPLITS)}}}/<class>/<images> (or split/{split}.csv)")
        classes = class_images(sdir)
        if not classes:
            raise UserError(f"--dataset {ddir}: {split}/ holds no <class>/ folders")
        empty = [c for c, imgs in classes.items() if not imgs]
        if empty:
            raise UserError(f"--dataset {ddir}: class folder {split}/{empty[0]} holds no images "
                            f"(suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
        out[split] = classes
    return out


def _decode(path: Path, size: int | None = None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as exc:
        raise UserError(f"{path}: corrupt or unreadable image ({type(exc).__name__})") from None


def folder_fields(ddir: Path) -> dict:
    """``DatasetSpec`` fields of the folder dataset at ``ddir`` (an absolute path, also its name)."""
    layout = check_layout(ddir)
    train = [p for imgs in layout["meta_train"].values() for p in imgs]
    if not train:
        raise UserError(f"--dataset {ddir}: meta_train/ must hold the images (a CSV alone is not enough to "
                        "size the dataset)")
    first = _decode(train[0])
    size = int(min(MAX_SIZE, max(MIN_SIZE, min(first.shape[:2]))))
    listing = hashlib.sha256("\n".join(str(p.relative_to(ddir)) for p in train).encode()).hexdigest()
    cache = ddir / ".cache" / "stats.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("listing") == listing and cached.get("image_size") == size:
            return {"name": str(ddir), "folder": str(ddir), "image_size": size,
                    "mean": tuple(cached["mean"]), "std": tuple(cached["std"])}
    except (OSError, ValueError, KeyError):
        pass
    rng = np.random.default_rng(0)
    sample = [train[i] for i in sorted(rng.choice(len(train), size=min(STATS_SAMPLE, len(train)), replace=False))]
    pixels = np.stack([_decode(p, size) for p in sample]).astype(np.float64) / 255.0    # [N, S, S, 3]
    mean = pixels.mean(axis=(0, 1, 2))
    std = np.maximum(pixels.std(axis=(0, 1, 2)), 1e-3)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        Path(tmp).write_text(json.dumps({"listing": listing, "image_size": size, "mean": mean.tolist(),
                                         "std": std.tolist(), "sample": len(sample)}))
    return {"name": str(ddir), "folder": str(ddir), "image_size": size,
            "mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std)}


def class_counts(ddir: Path) -> dict[str, int]:
    """Classes per split (for the way checks before any work starts)."""
    layout = check_layout(ddir)
    counts = {}
    for split in SPLITS:
        if layout[split]:
            counts[split] = len(layout[split])
        else:
            import csv

            with open(ddir / "split" / f"{split}.csv", newline="") as f:
                counts[split] = len({row[1] for row in list(csv.reader(f))[1:] if len(row) == 2})
    return counts


def is_folder_name(name: str) -> bool:
    """A dataset given as a folder (``--dataset ./my_data``, ``~/data/x``, ``/abs/path``), not a name."""
    return "/" in name or os.sep in name or name.startswith(("~", "."))


def absolute_name(name: str) -> str:
    """A folder dataset's name is its absolute path (Ray actors with another working directory find
    the same folder); registered names are returned unchanged."""
    return str(Path(name).expanduser().resolve()) if is_folder_name(name) else name


def check_ways(datasets, pool_way: int, train_way: int, episode_way: int | None = None) -> None:
    """A user's folder with fewer classes than the tasks need is an error before any work starts.
    ``episode_way``: the ways of a meta-training episode (``learner.train_way``), drawn from meta_train."""
    for d in datasets:
        if not is_folder_name(d):
            continue
        counts = class_counts(Path(d))
        for split, way, key in (("meta_train", pool_way, "pool.way"),
                                ("meta_train", episode_way or 0, "learner.train_way"),
                                ("meta_val", train_way, "train.way"), ("meta_test", train_way, "train.way")):
            if counts[split] < way:
                raise UserError(f"--dataset {d}: {way}-way tasks ({key}) need {way} classes but {split}/ has "
                                f"{counts[split]}; lower it with --set {key}=N")


__all__ = ["IMAGE_SUFFIXES", "SPLITS", "absolute_name", "check_layout", "check_ways", "class_counts",
           "folder_fields", "is_folder_name"]
