"""Read one split of a dataset in the seeds' on-disk layout into memory.

Layout under a data root (see ``registry.py``)::

    <root>/<folder>/meta_{train,val,test}/<class>/<image>      (or any other place, e.g. CUB's images/)
    <root>/<folder>/split/meta_{train,val,test}.csv             header ``filename,label``

The CSV is the source of truth: ``filename`` is relative to ``<root>/<folder>`` (or absolute) and
``label`` is the class name. Class ids are the index of the name in ``sorted(class names)`` -- never
CSV or directory-listing order (the seeds' ids depended on ``os.listdir``).

A split is decoded once into a single ``uint8 [N, 3, S, S]`` NumPy array: small enough for the
benchmarks used here (CIFAR-FS meta-train is 184 MB), shareable zero-copy through Ray's object
store, and fast to index for episodes. Decoding tens of thousands of images is slow, so the array
is cached in ``<root>/<folder>/.cache/<split>_<S>.npz``, keyed by the SHA-256 of the split CSV.
Editing image files in place without touching the CSV is not detected: delete ``.cache`` then.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..utils import atomic_path, sha256_file
from .registry import SPLITS, DatasetSpec, get_spec, is_folder_name

log = logging.getLogger(__name__)

CSV_HEADER = ["filename", "label"]
CACHE_VERSION = "1"          # bump when the cache's content or layout changes
GLYPHS_MARKER = "glyphs.json"


@dataclass(eq=False)
class ImageSplit:
    """All images of one split, in memory.

    ``images`` is ``uint8 [N, 3, S, S]`` (C-contiguous NCHW, not normalised: see
    ``transforms.normalize``), ``labels`` int64 class ids in ``0..C-1``, the index of the class in
    the sorted ``class_names``. Row order is the CSV's (sorted file names), so "the first 80% of a
    class" is reproducible.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    spec: DatasetSpec
    split: str
    _by_class: list[np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, S, S], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels shape {self.labels.shape} does not match {len(self.images)} images")
        self.images = np.ascontiguousarray(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.class_names = list(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def indices_of(self, c: int) -> np.ndarray:
        """Row indices of class ``c`` in CSV order (computed once for all classes, then cached)."""
        if self._by_class is None:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
            self._by_class = [order[bounds[i]:bounds[i + 1]] for i in range(self.num_classes)]
        return self._by_class[c]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, class_ids, max_per_class: int | None = None) -> "ImageSplit":
        """A new split holding only ``class_ids`` (re-numbered 0.. in sorted-name order).

        ``max_per_class`` keeps the first rows of each class in CSV order (deterministic).
        """
        keep = sorted({int(c) for c in class_ids})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_classes:
            raise ValueError(f"class ids must be within 0..{self.num_classes - 1}, got {list(class_ids)}")
        rows = [self.indices_of(c)[:max_per_class] for c in keep]
        idx = np.sort(np.concatenate(rows))
        remap = np.full(self.num_classes, -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        return ImageSplit(self.images[idx], remap[self.labels[idx]], [self.class_names[c] for c in keep],
                          self.spec, self.split)


# --------------------------------------------------------------------------------------------------
# Locating datasets


def dataset_dir(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / get_spec(name).folder


def split_csv_path(ddir: Path, split: str) -> Path:
    return ddir / "split" / f"{split}.csv"


def _filelist_command(name: str, root: str | os.PathLike) -> str:
    return f"python -m raydfml.data.filelist {name} --root {root}"


def _layout_hint(name: str, ddir: Path) -> str:
    """Where the images go: CUB and Flower keep the layout of their archives (see filelist.py)."""
    if name == "cub":
        return f"{ddir}/images/<class>/<image> (the CUB_200_2011 archive as extracted)"
    if name == "flower":
        return f"{ddir}/jpg/image_00001.jpg ... plus {ddir}/imagelabels.mat"
    return f"{ddir}/meta_train/<class>/<image> (likewise meta_val, meta_test)"


# Small embedded sets for tests and the smoke profile: generated in seconds, same code path.
# ``glyphs-smoke-<script>`` are the smoke domains of scenario md (one script each, so two of them
# share no class): 18 classes split 8/5/5, i.e. enough meta-train classes for distinct 5-way teachers
# and exactly 5 for 5-way meta-val/meta-test tasks.
SMOKE_DOMAIN_SCRIPTS = ("latin", "greek", "cyrillic", "armenian", "georgian")
SMALL_GLYPH_SETS = {
    "glyphs-smoke": {"classes": 20, "images_per_class": 30, "split": (10, 5, 5)},
    **{f"glyphs-smoke-{d}": {"domain": d, "classes": 18, "images_per_class": 30, "split": (8, 5, 5)}
       for d in SMOKE_DOMAIN_SCRIPTS},
}

# Full-size domain sets ``glyphs-<script>`` (scenario md): sized for 2 CPU cores, four of them are
# ~40k images (~2 min to render). A script with fewer letters than DOMAIN_MAX_CLASSES gives all of
# them (greek 37, georgian 41).
DOMAIN_MAX_CLASSES = 60
DOMAIN_IMAGES_PER_CLASS = 200
MIN_EVAL_CLASSES = 5          # a 5-way meta-val/meta-test task needs 5 classes in the split


def domain_split(classes: int) -> tuple[int, int, int]:
    """64/16/20% of ``classes`` (val and test rounded down) with at least MIN_EVAL_CLASSES in val and
    test: 60 -> (39, 9, 12), 41 -> (27, 6, 8), 37 -> (25, 5, 7)."""
    val = max(MIN_EVAL_CLASSES, classes * 16 // 100)
    test = max(MIN_EVAL_CLASSES, classes * 20 // 100)
    if classes - val - test < MIN_EVAL_CLASSES:
        raise UserError(f"a glyph domain of {classes} classes is too small for a {MIN_EVAL_CLASSES}-way "
                        f"meta_train/meta_val/meta_test split")
    return classes - val - test, val, test


def glyph_set_params(name: str) -> dict:
    """The ``generate_glyphs`` keyword arguments (besides root) of the embedded set ``name``:
    the default ``glyphs``, a smoke set, or a single-script domain ``glyphs-<script>``."""
    spec = get_spec(name)
    if not spec.embedded:
        raise UserError(f"dataset {spec.name!r} is not an embedded glyph set")
    kwargs: dict = {"name": spec.name}
    if spec.name in SMALL_GLYPH_SETS:
        kwargs.update(SMALL_GLYPH_SETS[spec.name])
    elif spec.name.startswith("glyphs-"):
        from . import glyphs  # lazy: rendering pulls in matplotlib's font machinery

        domain = spec.name.split("-", 1)[1]
        classes = min(DOMAIN_MAX_CLASSES, glyphs.available_classes(domain))
        kwargs.update(domain=domain, classes=classes, images_per_class=DOMAIN_IMAGES_PER_CLASS,
                      split=domain_split(classes))
    return kwargs


def ensure_dataset(root: str | os.PathLike, name: str, progress: bool = True) -> Path:
    """Return the dataset directory, generating the embedded glyph sets when absent (with a progress
    bar unless ``progress`` is false).

    Real datasets are never downloaded (nothing is fetched at run time): a missing folder is a
    ``UserError`` that says where to put the images and how to write the split CSVs.
    """
    spec = get_spec(name)
    ddir = Path(root) / spec.folder
    if spec.embedded:
        if not (ddir / GLYPHS_MARKER).is_file():
            # The marker is written last by the generator, so its absence also means "incomplete".
            from . import glyphs  # lazy: rendering pulls in matplotlib's font machinery

            glyphs.generate_glyphs(root, progress=progress, **glyph_set_params(spec.name))
        return ddir
    if not ddir.is_dir():
        raise UserError(f"dataset {spec.name!r} not found at {ddir}: put its images there as {_layout_hint(spec.name, ddir)}, "
                        f"then write the split CSVs with `{_filelist_command(spec.name, root)}`")
    return ddir


def read_split_csv(csv_path: Path, ddir: Path) -> tuple[list[Path], list[str], list[int]]:
    """Parse a split CSV: resolved image paths, class names and the CSV line of each row.

    Uses the ``csv`` module, so quoted file names containing commas work (the seeds' ``split(',')``
    broke on them).
    """
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != CSV_HEADER:
            raise UserError(f"{csv_path}: first line must be the header 'filename,label', got {header!r}")
        paths, labels, lines = [], [], []
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2 or not row[0] or not row[1]:
                raise UserError(f"{csv_path}:{reader.line_num}: expected 'filename,label', got {row!r}")
            paths.append(ddir / row[0])  # an absolute filename stays absolute
            labels.append(row[1])
            lines.append(reader.line_num)
    return _strip_foreign_prefixes(paths, csv_path, ddir), labels, lines


def _strip_foreign_prefixes(paths: list[Path], csv_path: Path, ddir: Path) -> list[Path]:
    """Rows written on another machine (the seeds' filelist scripts store e.g.
    ``./DFL2Ldata/cifar100/meta_train/<class>/<file>``) are found by their trailing
    ``<split>/<class>/<file>`` under the dataset folder; said once per CSV. Rows that exist, or whose
    trailing part does not exist either, are kept as written (the decoder then names the missing file)."""
    moved = 0
    out = []
    for p in paths:
        if not p.is_file():
            parts = p.parts
            split_at = max((i for i, part in enumerate(parts[:-2]) if part in SPLITS), default=None)
            if split_at is not None and (candidate := ddir.joinpath(*parts[split_at:])).is_file():
                p, moved = candidate, moved + 1
        out.append(p)
    if moved:
        example = next(q for q, r in zip(paths, out) if q != r)
        print(f"{csv_path}: {moved} of {len(paths)} filenames carry another machine's prefix (e.g. {example}); "
              f"read by their trailing <split>/<class>/<file> under {ddir}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------------------
# Decoding


def _decode(path: Path, size: int, csv_path: Path, line: int) -> np.ndarray:
    """Decode one image to ``uint8 [3, size, size]``; any failure is the user's file, so a UserError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # forces a full decode, so a truncated file fails here rather than silently
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"{csv_path}:{line}: image file {path} does not exist") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise UserError(f"{path}: corrupt or unreadable image ({type(exc).__name__}: {exc}) "
                        f"listed in {csv_path}:{line}") from None
    return arr.transpose(2, 0, 1)


def _usable_cpus() -> int:
    # Respect CPU affinity (e.g. a Ray worker pinned to a few cores), not just the host's count.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS / Windows
        return os.cpu_count() or 1


def _decode_all(paths: list[Path], size: int, csv_path: Path, lines: list[int], progress: bool,
                desc: str, chunk: int = 256) -> np.ndarray:
    """Decode into one preallocated array with a thread pool (Pillow releases the GIL while decoding).

    Chunks are consumed in order, so the error reported is the first bad row of the CSV, and the
    remaining chunks are cancelled instead of decoding a whole split after a failure.
    """
    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)

    def work(lo: int) -> int:
        hi = min(lo + chunk, len(paths))
        for i in range(lo, hi):
            images[i] = _decode(paths[i], size, csv_path, lines[i])
        return hi - lo

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(paths), desc=desc, unit="img")
    workers = max(1, min(16, _usable_cpus()))
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for done in pool.map(work, range(0, len(paths), chunk)):  # re-raises a worker's error
            if bar is not None:
                bar.update(done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return images


# --------------------------------------------------------------------------------------------------
# Cache


def _files_fingerprint(paths: list[Path]) -> str:
    """A hash of each file's size and modification time (a missing file counts as such)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(b"missing;")
    return h.hexdigest()[:16]


def _cache_path(ddir: Path, split: str, size: int) -> Path:
    return ddir / ".cache" / f"{split}_{size}.npz"


def _read_cache(path: Path, key: str) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The cached arrays, or None when absent, stale (different CSV) or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                log.info("cache %s is stale (split CSV changed); rebuilding", path)
                return None
            return z["images"], z["labels"], [str(c) for c in z["class_names"]]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable cache %s (%s); rebuilding", path, exc)
        return None


def _write_cache(path: Path, key: str, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> None:
    """Best effort: a read-only dataset directory only costs the speed-up, not the run."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # file object: savez would append .npz
            np.savez(f, key=np.array(key), images=images, labels=labels, class_names=np.array(class_names))
    except OSError as exc:
        log.warning("could not write cache %s (%s); the next load will decode again", path, exc)


# --------------------------------------------------------------------------------------------------
# Loading


def load_split(root: str | os.PathLike, name: str, split: str, image_size: int | None = None,
               progress: bool = False, use_cache: bool = True) -> ImageSplit:
    """Load ``split`` (``meta_train``/``meta_val``/``meta_test``) of dataset ``name`` under ``root``.

    Images are resized to ``image_size`` (default: the spec's) with bilinear interpolation, the
    seeds' ``Resize((s, s))``. Does not generate or download anything: call ``ensure_dataset`` first.
    """
    from PIL import ImageFile

    # Pillow otherwise pads truncated files with grey and returns them as if they were fine.
    ImageFile.LOAD_TRUNCATED_IMAGES = False

    spec = get_spec(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    size = int(image_size or spec.image_size)
    if size <= 0:
        raise UserError(f"image size must be positive, got {size}")
    ddir = Path(root) / spec.folder
    if not ddir.is_dir():
        if spec.embedded:
            raise UserError(f"dataset {spec.name!r} not found at {ddir}; it is generated by ensure_dataset")
        ensure_dataset(root, spec.name)  # raises the "where to put it" message
    csv_path = split_csv_path(ddir, split)
    if not csv_path.is_file() and is_folder_name(spec.name):
        from .filelist import write_folder_split_csvs  # a user's folder: list it as the seeds' scripts would

        counts = write_folder_split_csvs(ddir)
        print(f"--dataset {ddir}: wrote split/*.csv ({', '.join(f'{k} {v} images' for k, v in counts.items())})",
              file=sys.stderr)
    if not csv_path.parent.is_dir():
        raise UserError(f"split folder {csv_path.parent} does not exist; write the split CSVs with "
                        f"`{_filelist_command(spec.name, root)}`")
    if not csv_path.is_file():
        raise UserError(f"split CSV {csv_path} does not exist; write it with "
                        f"`{_filelist_command(spec.name, root)}`")

    paths, names, lines = read_split_csv(csv_path, ddir)
    if not paths:
        raise UserError(f"split CSV {csv_path} lists no images (empty split)")
    # The cache is keyed by the CSV *and* every listed file's size and mtime: an image replaced or
    # truncated after the first run is decoded again (and its error reported), not served stale.
    key = f"v{CACHE_VERSION}:{sha256_file(csv_path)}:{_files_fingerprint(paths)}"
    cache = _cache_path(ddir, split, size)
    cached = _read_cache(cache, key) if use_cache else None
    if cached is not None:
        images, labels, class_names = cached
        return ImageSplit(images, labels, class_names, spec, split)

    class_names = sorted(set(names))
    class_id = {c: i for i, c in enumerate(class_names)}
    labels = np.fromiter((class_id[n] for n in names), dtype=np.int64, count=len(names))

    t0 = time.perf_counter()
    images = _decode_all(paths, size, csv_path, lines, progress, desc=f"{spec.name}/{split}")
    log.info("decoded %d images of %s/%s in %.1fs", len(paths), spec.name, split, time.perf_counter() - t0)
    if use_cache:
        _write_cache(cache, key, images, labels, class_names)
    return ImageSplit(images, labels, class_names, spec, split)
