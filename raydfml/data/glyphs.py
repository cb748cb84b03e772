"""The embedded default dataset: letter glyphs rendered from the fonts that ship with matplotlib.

Why it exists: a data-free meta-learning run needs a few-shot benchmark that is always at hand, is
small enough for a laptop, and needs no download. Every class is one letter (``A``, ``ж``, ``Ω``,
``ա``, ``ბ``...); every image is that letter in a random font, size, colour pair, rotation and shift,
32x32 RGB like CIFAR-FS. Its accuracies are NOT comparable with the papers' tables.

Output (the seeds' layout, read back by the same loader as the real datasets)::

    <root>/<name>/meta_{train,val,test}/<class>/00000.png
    <root>/<name>/split/meta_{train,val,test}.csv     (filename,label)
    <root>/<name>/glyphs.json                         (parameters; written last: marks "complete")

Class folders are ``u<hex code point>_<unicode name>``, e.g. ``u0041_latin_capital_letter_a``.

How the class inventory is built (deterministic; no randomness, no seed)
-----------------------------------------------------------------------
1. Fonts: the 12 DejaVu faces (Sans, Sans Mono, Serif; each regular, bold, oblique/italic,
   bold-oblique). STIX is not used: its italic faces cover only ~1,060 code points, which cut the
   common letters from ~1,340 to ~560 and removed Armenian and Georgian entirely.
2. Candidates: code points that EVERY font maps, of category Lu/Ll/Lo (modifier letters, Lm, are
   superscripts and accent-like marks), and that are their own NFKC and NFD form: compatibility
   variants (``µ`` vs ``μ``) are the same letter, and precomposed letters with diacritics (``à``,
   ``ἄ``) would be classes told apart only by a few-pixel accent at 32x32, i.e. mostly label noise.
3. Deduplication of look-alikes, in sorted code-point order (the first one is kept): Latin ``A`` vs
   Greek ``Α`` vs Cyrillic ``А``, and case pairs that differ only in size (``o``/``O``, ``c``/``C``,
   ``s``/``S``, ``x``/``X``, small capitals ``ʙ``/``B``). Images are rendered at a random size, so
   two glyphs whose shapes agree up to scale are not two classes. Each candidate is rendered in
   DejaVu Sans, cropped to its ink, padded to a square (aspect ratio is visible in the images, so it
   is kept) and binarised at 24x24. Two glyphs are duplicates when they have the same number of
   connected parts (``i``/``l``, ``j``/``J`` and ``ʘ``/``O`` differ by a dot) and each one's ink
   lies, for at least 95%, within 1 px of the other's ink. That tolerance absorbs the stroke-weight
   difference between a scaled-up lowercase and its capital, which made plain binary IoU unusable
   (``c``/``C`` scored lower than ``E``/``F``), while a crossbar (``A``/``Λ``) still separates.
   Borderline merges remain (``п`` into ``n``, ``Γ`` into ``r``, ``ł`` into ``I``); they make the
   set slightly smaller, never noisier.

Classes per domain after deduplication (matplotlib 3.11's DejaVu 2.35 fonts; ``python -m
raydfml.data.glyphs --list-domains`` prints the live numbers)::

    all 415 · latin 232 · armenian 58 · cyrillic 47 · georgian 41 · greek 37

Because deduplication is global, the single-script domains are pairwise disjoint in code points AND
in look: the Cyrillic domain holds no glyph that already appears, identical, in the Latin one.
That is what the multi-domain scenario needs (datasets ``glyphs-<domain>``, at most 60 classes of
200 images each, e.g. all 37 Greek classes split 25/5/7: see ``layout.glyph_set_params``).

What the seed decides
---------------------
* Which classes are used does not depend on the seed: ``classes`` glyphs evenly spaced over the
  domain's sorted inventory (so ``all`` mixes scripts in proportion). Seeds vary the benchmark, not
  its vocabulary.
* The class -> split assignment is a permutation drawn from ``default_rng([seed, 0])``.
* The images of a class come from ``default_rng([seed, code point])`` alone, so they do not depend
  on the class count, the order of work or the number of worker processes. Same seed (and the same
  Pillow/FreeType/zlib) => byte-identical files; another seed => other images.

Crash safety: the dataset is written to a hidden sibling (``.<name>.partial-<host>-<pid>``) and
renamed into place when complete, ``glyphs.json`` being its last file; an existing complete dataset
with the same parameters is returned as is.

CLI: ``python -m raydfml.data.glyphs --root data --seed 0`` (``--help`` for the options).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import shutil
import socket
import time
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageFont

from ..errors import UserError, run_cli
from ..utils import atomic_path
from .filelist import write_folder_split_csvs
# Re-exported: the inventory is part of this module's API.
from .glyph_domains import DOMAINS, Domain  # noqa: F401
from .glyph_inventory import (DEFAULT_SPLIT, FONT_FILES, Glyph, _render_ink, assign_splits,  # noqa: F401
                              available_classes, default_split, domain_glyphs, font_paths, glyph_inventory,
                              select_classes)
from .registry import SPLITS

DEFAULT_CLASSES = 100
DEFAULT_IMAGES_PER_CLASS = 600
GLYPHS_VERSION = 1            # bump whenever the inventory or the rendering changes the output
MARKER = "glyphs.json"        # also ``layout.GLYPHS_MARKER``

IMAGE_SIZE = 32
SUPERSAMPLE = 2               # render at 64x64, box-filter down to 32x32 (antialiasing)

# Image randomisation, in output (32 px) units where it says px.
SIZE_RANGE = (0.5, 0.8)       # longest side of the glyph's ink as a fraction of the image side
MAX_ROTATION_DEG = 15.0
MAX_SHIFT_PX = 3.0            # reduced when needed so the rotated glyph stays inside the image
MIN_LUMA_CONTRAST = 80.0      # |luma(fg) - luma(bg)| on a 0..255 scale, so every glyph is legible



# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1024)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _master_ink(path: str, ch: str) -> Image.Image:
    """The glyph's ink at the largest size an image can ask for, so the affine map only shrinks it."""
    probe = _render_ink(_font(path, 100), ch)
    largest = SIZE_RANGE[1] * IMAGE_SIZE * SUPERSAMPLE
    size = max(4, round(100 * largest / max(probe.size)))
    return _render_ink(_font(path, size), ch)


@dataclass(frozen=True)
class ImageParams:
    """Per-image random draws of one class, as arrays of length n."""

    font: np.ndarray        # index into FONT_FILES
    size: np.ndarray        # longest ink side / image side
    angle: np.ndarray       # degrees
    shift: np.ndarray       # [n, 2] in [-1, 1], scaled to the room left around the glyph
    fg: np.ndarray          # [n, 3] uint8-valued
    bg: np.ndarray          # [n, 3]


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _contrasting_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random (fg, bg) pairs, redrawn until their luma differs by MIN_LUMA_CONTRAST."""
    fg = rng.integers(0, 256, size=(n, 3)).astype(np.float64)
    bg = rng.integers(0, 256, size=(n, 3)).astype(np.float64)
    while True:
        bad = np.abs(_luma(fg) - _luma(bg)) < MIN_LUMA_CONTRAST
        if not bad.any():
            return fg, bg
        fg[bad] = rng.integers(0, 256, size=(bad.sum(), 3))
        bg[bad] = rng.integers(0, 256, size=(bad.sum(), 3))


def sample_params(rng: np.random.Generator, n: int) -> ImageParams:
    """All of a class's random choices, drawn in a fixed order (so they are reproducible)."""
    font = rng.integers(0, len(FONT_FILES), size=n)
    size = rng.uniform(*SIZE_RANGE, size=n)
    angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, size=n)
    shift = rng.uniform(-1.0, 1.0, size=(n, 2))
    fg, bg = _contrasting_colours(rng, n)
    return ImageParams(font, size, angle, shift, fg, bg)


def _placed_mask(ink: Image.Image, size: float, angle: float, shift: Sequence[float]) -> Image.Image:
    """Scale, rotate about its centre and shift the ink into the supersampled canvas (one affine map)."""
    canvas = IMAGE_SIZE * SUPERSAMPLE
    w, h = ink.size
    scale = size * canvas / max(w, h)
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    # Room left on each axis once the rotated glyph's bounding box is centred, minus a 1 px margin.
    half_w = scale * (abs(cos) * w + abs(sin) * h) / 2
    half_h = scale * (abs(sin) * w + abs(cos) * h) / 2
    max_shift = MAX_SHIFT_PX * SUPERSAMPLE
    room_x = min(max_shift, max(0.0, canvas / 2 - half_w - SUPERSAMPLE))
    room_y = min(max_shift, max(0.0, canvas / 2 - half_h - SUPERSAMPLE))
    out_x, out_y = canvas / 2 + shift[0] * room_x, canvas / 2 + shift[1] * room_y
    # PIL wants the inverse map: output pixel -> input pixel.
    a, b = cos / scale, sin / scale
    d, e = -sin / scale, cos / scale
    c = w / 2 - a * out_x - b * out_y
    f = h / 2 - d * out_x - e * out_y
    return ink.transform((canvas, canvas), Image.Transform.AFFINE, (a, b, c, d, e, f),
                         resample=Image.Resampling.BILINEAR, fillcolor=0)


def render_images(glyph: Glyph, params: ImageParams, fonts: Sequence[Path]) -> np.ndarray:
    """``uint8 [n, 32, 32, 3]`` images of one glyph."""
    n, side = len(params.font), IMAGE_SIZE * SUPERSAMPLE
    masters: dict[int, Image.Image] = {}
    strip = Image.new("L", (side, side * n))  # all masks stacked: one copy into numpy, not n
    for i, font_index in enumerate(params.font):
        if font_index not in masters:
            masters[font_index] = _master_ink(str(fonts[font_index]), glyph.char)
        mask = _placed_mask(masters[font_index], params.size[i], params.angle[i], params.shift[i])
        strip.paste(mask, (0, side * i))
    # Box-filter the supersampled masks down to the image size: the antialiasing step.
    k = SUPERSAMPLE
    ink = np.asarray(strip).reshape(n, IMAGE_SIZE, k, IMAGE_SIZE, k).sum(axis=(2, 4), dtype=np.uint32)
    alpha = (ink / np.float32(255 * k * k)).astype(np.float32)[..., None]
    fg, bg = params.fg.astype(np.float32), params.bg.astype(np.float32)
    images = bg[:, None, None, :] + alpha * (fg - bg)[:, None, None, :]
    return np.rint(images).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a ``uint8 [H, W, 3]`` image.

    Pillow writes no timestamp or other varying chunk, so equal pixels give equal bytes. zlib level 1:
    a 32x32 PNG fills one 4 KiB disk block at any level, and level 1 encodes ~25% faster.
    """
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _image_stem(i: int, n: int) -> str:
    return f"{i:0{max(5, len(str(n - 1)))}d}"


def _write_class(job: tuple[Path, Glyph, int, int, tuple[str, ...]]) -> int:
    """Render and save one class's images (runs in a worker process when workers > 1)."""
    class_dir, glyph, seed, n, fonts = job
    rng = np.random.default_rng([seed, glyph.codepoint])
    images = render_images(glyph, sample_params(rng, n), [Path(f) for f in fonts])
    class_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        # Encoding in memory and writing the bytes is ~25% faster than Image.save(path).
        (class_dir / f"{_image_stem(i, n)}.png").write_bytes(encode_png(image))
    return n


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------

def _parameters(seed: int, classes: int, images_per_class: int, split: Sequence[int], domain: str) -> dict:
    """What glyphs.json must match for an existing dataset to be reused."""
    return {"version": GLYPHS_VERSION, "seed": seed, "classes": classes,
            "images_per_class": images_per_class, "split": list(split), "domain": domain}


def read_marker(dataset_dir: str | os.PathLike) -> dict | None:
    """The dataset's glyphs.json, or None when absent or unreadable (an incomplete dataset)."""
    try:
        return json.loads((Path(dataset_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _matches(marker: dict | None, params: dict) -> bool:
    return isinstance(marker, dict) and all(marker.get(k) == v for k, v in params.items())


def _validate(name: str, seed: int, classes: int, images_per_class: int,
              split: Sequence[int] | None, domain: str) -> tuple[int, int, int]:
    """Check every option up front (a UserError naming it) and return the resolved split."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"--name {name!r}: must be a plain folder name (no slashes, not hidden)")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"--seed {seed}: must be a non-negative integer")
    if images_per_class < 1:
        raise UserError(f"--images-per-class {images_per_class}: must be at least 1")
    available = available_classes(domain)
    if classes > available:
        raise UserError(f"--classes {classes}: domain {domain!r} offers only {available} distinct glyphs "
                        f"(ask for at most {available})")
    resolved = tuple(int(s) for s in (default_split(classes) if split is None else split))
    option = "--classes" if split is None else "--split"
    if len(resolved) != 3 or min(resolved) < 1 or sum(resolved) != classes:
        raise UserError(f"{option}: {classes} classes cannot be split into non-empty "
                        f"meta_train/meta_val/meta_test parts as {list(resolved)} (the split must have "
                        f"3 positive parts summing to --classes)")
    return resolved  # type: ignore[return-value]


def _partial_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial-{socket.gethostname()}-{os.getpid()}")


def _remove_dead_partials(target: Path) -> None:
    """Delete work folders left by killed runs on this host (a live run's folder is left alone)."""
    prefix = f".{target.name}.partial-{socket.gethostname()}-"
    for path in target.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix):]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _looks_like_glyphs(path: Path) -> bool:
    """An existing folder we may delete: only the entries this module writes."""
    return all(p.name in {*SPLITS, "split", MARKER} for p in path.iterdir())


def _check_replaceable(target: Path, params: dict, force: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir() or not _looks_like_glyphs(target):
        raise UserError(f"{target} exists and is not a glyph dataset; remove it or pick another --name")
    marker = read_marker(target)
    if isinstance(marker, dict) and not force:
        differing = {k: marker.get(k) for k, v in params.items() if marker.get(k) != v}
        raise UserError(f"{target} already holds a glyph dataset generated with {differing}; "
                        f"pass --force to replace it, or pick another --name")


def _install(work: Path, target: Path) -> None:
    """Swap the finished work folder into place (moving any old dataset aside first)."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{socket.gethostname()}-{os.getpid()}")
        os.replace(target, trash)
        os.replace(work, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(work, target)


def _render_all(jobs: list, workers: int, progress: bool) -> int:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="glyph classes", unit="class", disable=not progress)
    done = 0
    try:
        if workers <= 1:
            for job in jobs:
                done += _write_class(job)
                bar.update()
        else:
            # fork: the workers inherit the imported modules (no torch re-import per worker).
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ctx.Pool(workers) as pool:
                for n in pool.imap_unordered(_write_class, jobs):
                    done += n
                    bar.update()
    finally:
        bar.close()
    return done


def generate_glyphs(root: str | os.PathLike, name: str = "glyphs", seed: int = 0,
                    classes: int = DEFAULT_CLASSES, images_per_class: int = DEFAULT_IMAGES_PER_CLASS,
                    split: Sequence[int] | None = None, domain: str = "all", progress: bool = True,
                    force: bool = False, workers: int | None = None) -> Path:
    """Render the glyph dataset into ``<root>/<name>`` and return that path.

    ``split`` is (train, val, test) class counts; None means DEFAULT_SPLIT's proportions (exactly
    (64, 16, 20) for 100 classes). An existing complete dataset with the same parameters is returned
    untouched; an incomplete one (no glyphs.json) is regenerated; a complete one with other
    parameters is a UserError unless ``force``. ``workers`` processes render classes in parallel
    (default: up to 2 CPUs); the output does not depend on it.
    """
    split = _validate(name, seed, classes, images_per_class, split, domain)
    params = _parameters(int(seed), classes, images_per_class, split, domain)
    target = Path(root) / name
    if _matches(read_marker(target), params) and not force:
        return target
    _check_replaceable(target, params, force)

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(target)
    work = _partial_dir(target)
    shutil.rmtree(work, ignore_errors=True)
    try:
        chosen = select_classes(domain_glyphs(domain), classes)
        fonts = tuple(str(p) for p in font_paths())
        jobs = [(work / split_name / g.class_name, g, int(seed), images_per_class, fonts)
                for split_name, glyphs in assign_splits(chosen, split, int(seed)).items() for g in glyphs]
        workers = min(2, os.cpu_count() or 1) if workers is None else workers
        _render_all(jobs, min(workers, len(jobs)), progress)
        write_folder_split_csvs(work)
        _write_marker(work, params, fonts)
        if _matches(read_marker(target), params) and not force:
            return target  # a concurrent run finished the same dataset first
        _install(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _write_marker(dataset_dir: Path, params: dict, fonts: Iterable[str]) -> None:
    """glyphs.json, written last and atomically: its presence means "complete"."""
    import matplotlib
    import PIL
    from PIL import features

    marker = {**params, "image_size": IMAGE_SIZE, "fonts": [Path(f).name for f in fonts],
              "class_selection": "evenly spaced over the domain's sorted, deduplicated inventory",
              "rendered_with": {"pillow": PIL.__version__, "freetype": features.version("freetype2"),
                                "matplotlib": matplotlib.__version__, "unicode": unicodedata.unidata_version}}
    with atomic_path(dataset_dir / MARKER) as tmp:
        tmp.write_text(json.dumps(marker, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def _split_arg(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL,TEST class counts, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raydfml.data.glyphs",
        description="Render the embedded few-shot dataset: each class is one letter glyph (Latin, Greek, "
                    "Cyrillic, Armenian, Georgian; look-alikes removed), each image that glyph in a random "
                    "DejaVu font, size, colour pair, rotation and shift, 32x32 RGB. Writes "
                    "<root>/<name>/meta_{train,val,test}/<class>/*.png, split/meta_*.csv and glyphs.json. "
                    "Deterministic: the same seed gives byte-identical files. Accuracies on it are not "
                    "comparable with published benchmarks.")
    p.add_argument("--root", required=True, help="data root; the dataset goes to <root>/<name>")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the images (default 0)")
    p.add_argument("--name", default="glyphs", help="dataset folder name (default glyphs; use glyphs-<domain> "
                                                     "for single-script domains)")
    p.add_argument("--classes", type=int, default=DEFAULT_CLASSES,
                   help=f"number of glyph classes (default {DEFAULT_CLASSES}; at most what the domain offers, "
                        f"see --list-domains)")
    p.add_argument("--images-per-class", type=int, default=DEFAULT_IMAGES_PER_CLASS,
                   help=f"images rendered per class (default {DEFAULT_IMAGES_PER_CLASS})")
    p.add_argument("--split", type=_split_arg, default=None, metavar="TRAIN,VAL,TEST",
                   help="classes per split, summing to --classes (default: 64/16/20 proportions, e.g. 64,16,20 "
                        "for 100 classes)")
    p.add_argument("--domain", default="all",
                   help=f"which letters: {', '.join(DOMAINS)} (default all: mixed scripts)")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: up to 2)")
    p.add_argument("--force", action="store_true",
                   help="regenerate even if a complete dataset with the same or other parameters exists")
    p.add_argument("--list-domains", action="store_true", help="print the classes each domain offers and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_domains:
        for d in DOMAINS.values():
            print(f"{d.name:10s} {available_classes(d.name):4d} classes  {d.description}")
        return 0
    target = Path(args.root) / args.name
    kwargs = dict(name=args.name, seed=args.seed, classes=args.classes, images_per_class=args.images_per_class,
                  split=args.split, domain=args.domain)
    split = _validate(**kwargs)
    params = _parameters(args.seed, args.classes, args.images_per_class, split, args.domain)
    if _matches(read_marker(target), params) and not args.force:
        print(f"{target}: already complete with these parameters (use --force to regenerate)")
        return 0
    start = time.perf_counter()
    generate_glyphs(args.root, progress=not args.quiet, force=args.force, workers=args.workers, **kwargs)
    seconds = time.perf_counter() - start
    images = args.classes * args.images_per_class
    print(f"{target}: {images} images ({args.classes} classes, split {'/'.join(map(str, split))}) "
          f"in {seconds:.1f} s ({images / seconds:.0f} images/s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
