"""Write the split CSVs (``<dataset_dir>/split/meta_{train,val,test}.csv``, header ``filename,label``).

Replaces the seeds' ``write_*_filelist.py`` scripts::

    python -m raydfml.data.filelist <dataset> --root <data root>

Classes and files are always sorted, so class ids (assigned from sorted class names by the loader)
and row order never depend on a directory listing's order; the seeds used ``os.listdir`` and an
unseeded shuffle. Images are never copied or moved: filenames are written relative to the dataset
directory, and the loader resolves them the same way for every dataset.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

from ..errors import UserError, run_cli
from ..utils import atomic_path
from .folder import IMAGE_SUFFIXES
from .registry import SPLITS, get_spec, known_datasets

Rows = list[tuple[str, str]]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """Write ``filename,label`` rows atomically (never a half-written CSV under the final name)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            w.writerows(rows)


def _write_splits(dataset_dir: Path, rows_by_split: dict[str, Rows]) -> dict[str, int]:
    """Write all three CSVs, only after every split has been collected and checked."""
    for split, rows in rows_by_split.items():
        write_csv(dataset_dir / "split" / f"{split}.csv", sorted(rows))
    return {split: len(rows) for split, rows in rows_by_split.items()}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _class_dirs(folder: Path) -> list[Path]:
    # Hidden folders (.ipynb_checkpoints, .cache) are not classes.
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def write_folder_split_csvs(dataset_dir: str | Path) -> dict[str, int]:
    """For datasets already split into ``meta_*/<class>/<image>`` folders (CIFAR-FS, mini, FC100,
    tieredImageNet, glyphs).

    Filenames are written relative to ``dataset_dir``. Returns the number of rows per split. A
    missing or empty ``meta_*`` folder is a ``UserError`` (an empty CSV would only fail later).
    """
    dataset_dir = Path(dataset_dir)
    rows_by_split: dict[str, Rows] = {}
    for split in SPLITS:
        split_dir = dataset_dir / split
        if not split_dir.is_dir():
            raise UserError(f"split folder {split_dir} does not exist; expected "
                            f"{dataset_dir}/{{{','.join(SPLITS)}}}/<class>/<image>")
        rows: Rows = []
        for class_dir in _class_dirs(split_dir):
            rows += [(f"{split}/{class_dir.name}/{img.name}", class_dir.name) for img in _images_in(class_dir)]
        if not rows:
            raise UserError(f"split folder {split_dir} holds no images in <class>/ subfolders "
                            f"(suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
        rows_by_split[split] = rows
    return _write_splits(dataset_dir, rows_by_split)


def cub_split_of(index: int) -> str:
    """The seeds' CUB rule on the sorted class index: even -> train, 1 mod 4 -> val, 3 mod 4 -> test."""
    return "meta_train" if index % 2 == 0 else ("meta_val" if index % 4 == 1 else "meta_test")


def write_cub_split_csvs(dataset_dir: str | Path) -> dict[str, int]:
    """CUB-200-2011 as downloaded: ``<dataset_dir>/images/<200 class folders>/<image>.jpg``.

    Sorted class folders are split by :func:`cub_split_of` into 100/50/50 classes (asserted when
    there are exactly 200). Any other class count (e.g. a test fixture) gets the same rule.
    """
    dataset_dir = Path(dataset_dir)
    images_dir = dataset_dir / "images"
    if not images_dir.is_dir():
        raise UserError(f"CUB images folder {images_dir} does not exist; expected "
                        f"{images_dir}/<class>/<image> as in the CUB_200_2011 archive")
    classes = _class_dirs(images_dir)
    if len(classes) < 4:
        raise UserError(f"{images_dir} holds {len(classes)} class folders; the CUB split rule needs at least 4")
    rows_by_split: dict[str, Rows] = {s: [] for s in SPLITS}
    class_counts = dict.fromkeys(SPLITS, 0)
    for i, class_dir in enumerate(classes):
        split = cub_split_of(i)
        class_counts[split] += 1
        imgs = _images_in(class_dir)
        if not imgs:
            raise UserError(f"CUB class folder {class_dir} holds no images")
        rows_by_split[split] += [(f"images/{class_dir.name}/{img.name}", class_dir.name) for img in imgs]
    if len(classes) == 200 and list(class_counts.values()) != [100, 50, 50]:
        raise AssertionError(f"CUB split rule gave {class_counts}, expected 100/50/50")
    return _write_splits(dataset_dir, rows_by_split)


FLOWER_CLASS_SPLIT = (71, 15, 16)   # train/val/test classes of the 102, as in the seeds (and Meta-Dataset)


def flower_class_splits(class_ids: list[int]) -> dict[str, list[int]]:
    """Deterministic train/val/test lists of Flower class ids (71/15/16 for the 102 classes).

    The seeds hard-code three class lists that we do not have. Instead the classes are ordered by
    ``sha256("flower:<id>")`` -- a fixed pseudo-random permutation that, unlike a seeded RNG, can
    never change with a library version -- and cut into consecutive blocks of 71, 15 and 16. Results
    on Flower are therefore not on the seeds' exact class split. With another class count (test
    fixtures) the block sizes are scaled proportionally, at least one class each.
    """
    ids = sorted(set(class_ids))
    n = len(ids)
    if n == 102:
        n_train, n_val, n_test = FLOWER_CLASS_SPLIT
    else:
        n_val = max(1, round(n * FLOWER_CLASS_SPLIT[1] / 102))
        n_test = max(1, round(n * FLOWER_CLASS_SPLIT[2] / 102))
        n_train = n - n_val - n_test
        if n_train < 1:
            raise UserError(f"Flower labels hold {n} classes; the split needs at least 3")
    order = sorted(ids, key=lambda c: hashlib.sha256(f"flower:{c}".encode()).hexdigest())
    return {"meta_train": sorted(order[:n_train]),
            "meta_val": sorted(order[n_train:n_train + n_val]),
            "meta_test": sorted(order[n_train + n_val:])}


def flower_class_name(class_id: int) -> str:
    return f"class_{class_id:03d}"


def write_flower_split_csvs(dataset_dir: str | Path) -> dict[str, int]:
    """Oxford Flower-102 as downloaded: ``jpg/image_%05d.jpg`` and ``imagelabels.mat`` (labels 1..102).

    Image ``k`` (1-based) has label ``labels[k-1]``; classes are named ``class_001`` ... and split
    by :func:`flower_class_splits`.
    """
    dataset_dir = Path(dataset_dir)
    mat_path, jpg_dir = dataset_dir / "imagelabels.mat", dataset_dir / "jpg"
    if not mat_path.is_file():
        raise UserError(f"Flower labels file {mat_path} does not exist (imagelabels.mat from the Flower-102 site)")
    if not jpg_dir.is_dir():
        raise UserError(f"Flower images folder {jpg_dir} does not exist (jpg/image_00001.jpg ... from 102flowers.tgz)")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("reading Flower's imagelabels.mat needs scipy: pip install scipy") from None
    try:
        labels = [int(v) for v in loadmat(str(mat_path))["labels"].ravel()]
    except Exception as exc:  # scipy raises ValueError/KeyError/MatReadError on a bad file
        raise UserError(f"{mat_path}: cannot read a 'labels' array ({type(exc).__name__}: {exc})") from None
    if not labels:
        raise UserError(f"{mat_path}: 'labels' is empty")
    split_of = {c: s for s, ids in flower_class_splits(labels).items() for c in ids}
    rows_by_split: dict[str, Rows] = {s: [] for s in SPLITS}
    for k, label in enumerate(labels, start=1):
        name = f"image_{k:05d}.jpg"
        if not (jpg_dir / name).is_file():
            raise UserError(f"{jpg_dir / name} does not exist but {mat_path} has a label for image {k}")
        rows_by_split[split_of[label]].append((f"jpg/{name}", flower_class_name(label)))
    return _write_splits(dataset_dir, rows_by_split)


WRITERS = {"cub": write_cub_split_csvs, "flower": write_flower_split_csvs}


def write_split_csvs(root: str | Path, name: str) -> dict[str, int]:
    """Write the split CSVs of dataset ``name`` under ``root``; returns the rows per split."""
    spec = get_spec(name)
    ddir = Path(root) / spec.folder
    if not ddir.is_dir():
        raise UserError(f"dataset folder {ddir} does not exist (--root {root}, dataset {spec.name})")
    return WRITERS.get(spec.name, write_folder_split_csvs)(ddir)


def _count_classes(csv_path: Path) -> int:
    with open(csv_path, newline="") as f:
        return len({row[1] for row in list(csv.reader(f))[1:] if len(row) == 2})


HELP = f"""\
Write <root>/<folder>/split/meta_{{train,val,test}}.csv (header filename,label) for a dataset.

Layouts expected under --root (folder name in brackets):
  cifarfs [cifar100], miniimagenet [Miniimagenet], fc100 [FC100], tieredimagenet [tieredimagenet]:
      <folder>/meta_train/<class>/<image>, likewise meta_val and meta_test (classes split by folder)
  cub [CUB_200_2011]:
      CUB_200_2011/images/<200 class folders>/*.jpg  (sorted class i: i%2==0 train, i%4==1 val,
      i%4==3 test; 100/50/50)
  flower [flower]:
      flower/jpg/image_00001.jpg ... and flower/imagelabels.mat (71/15/16 classes by a fixed
      hash order; not the seeds' unpublished lists)
  glyphs*: generated by raydfml itself, which also writes its CSVs.

Files and classes are sorted; images are not copied. Known datasets: {', '.join(known_datasets())}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raydfml.data.filelist", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset name, e.g. cifarfs, miniimagenet, cub, flower")
    parser.add_argument("--root", required=True, help="data root that holds the dataset folder")
    args = parser.parse_args(argv)
    spec = get_spec(args.dataset)
    counts = write_split_csvs(args.root, spec.name)
    ddir = Path(args.root) / spec.folder
    for split, n in counts.items():
        classes = _count_classes(ddir / "split" / f"{split}.csv")
        print(f"{spec.name} {split}: {n} images, {classes} classes -> {ddir / 'split' / f'{split}.csv'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
