"""``python -m raydfml.zoo import``: a folder of the user's teacher checkpoints becomes a zoo.

Accepted files (``*.pt``, ``*.pth``), each read with ``torch.load(..., weights_only=True)``:

- a plain state dict of one of the registered backbones (what this engine's zoos hold);
- the seeds' teacher files, ``{'teacher': state_dict, 'specific': [class ids], 'acc': ...}`` (FREE, TGR,
  PURER, BiDf-MKD save them so), whose ``specific`` gives the teacher's classes;
- a torchvision-style ResNet state dict (``conv1``/``bn1``/``layer<k>.<b>``/``fc``), its keys mapped onto
  this engine's ResNet (``stem``/``stages``/``classifier``); the shapes must fit (a 7x7 ImageNet stem
  does not fit the CIFAR-style 3x3 one: the error names the first parameter that differs).

Each teacher's classes come from ``--classes`` (CSV ``file,classes`` with classes separated by ``;``,
or JSON ``{file: [classes]}``; classes as meta-train class names or ids) or from the seeds' ``specific``.
Class ids index the dataset's meta-train classes sorted by name. The weights are checked against the
architecture (strict), copied into the zoo as plain state dicts with their checksums, and each
teacher's accuracy on the meta-train images of its classes is measured and written to the manifest
(``heldout_acc``: these may be its training images, so it checks the import rather than generalisation).
Imported teachers are marked (``seed`` -1, ``epochs`` 0): a run uses them as they are and never trains
over them.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from ..data.layout import ensure_dataset, load_split
from ..data.registry import get_spec
from ..errors import UserError
from ..models import BACKBONES, build_model
from ..utils import atomic_path, exclusive_lock, sha256_file
from .manifest import TeacherRecord, read_manifest, write_manifest

IMPORTED_SEED = -1
SUFFIXES = (".pt", ".pth")


def is_imported(rec: TeacherRecord) -> bool:
    return rec.seed == IMPORTED_SEED and rec.epochs == 0


def _torchvision_to_ours(state: dict) -> dict:
    """conv1/bn1/layer<k>.<b>.*/downsample/fc -> stem/stages.<i>.*/shortcut/classifier."""
    out, blocks = {}, {}
    for key in state:
        if key.startswith("layer"):
            layer, block = key.split(".")[:2]
            blocks.setdefault((int(layer[5:]), int(block)), None)
    index = {lb: i for i, lb in enumerate(sorted(blocks))}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "conv1":
            new = "stem.0." + ".".join(parts[1:])
        elif parts[0] == "bn1":
            new = "stem.1." + ".".join(parts[1:])
        elif parts[0] == "fc":
            new = "classifier." + ".".join(parts[1:])
        elif parts[0].startswith("layer"):
            rest = ".".join(parts[2:]).replace("downsample.", "shortcut.")
            new = f"stages.{index[(int(parts[0][5:]), int(parts[1]))]}.{rest}"
        else:
            new = key
        out[new] = value
    return out


def _read_classes(path: Path | None) -> dict[str, list]:
    if path is None:
        return {}
    if not path.is_file():
        raise UserError(f"--classes {path}: no such file")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            return {str(k): list(v) for k, v in data.items()}
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (ValueError, OSError) as e:
        raise UserError(f"--classes {path}: unreadable ({type(e).__name__})") from None
    if not rows or [c.strip() for c in rows[0]] != ["file", "classes"]:
        raise UserError(f"--classes {path}: first line must be the header 'file,classes'")
    return {r[0].strip(): [c.strip() for c in r[1].split(";") if c.strip()] for r in rows[1:] if len(r) >= 2}


def _class_ids(classes: list, names: list[str], where: str) -> tuple[int, ...]:
    ids = []
    for c in classes:
        if isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.isdigit() and c not in names):
            i = int(c)
        elif c in names:
            i = names.index(c)
        else:
            raise UserError(f"{where}: class {c!r} is not a meta-train class name or id of the dataset")
        if not 0 <= i < len(names):
            raise UserError(f"{where}: class id {i} is outside the dataset's {len(names)} meta-train classes")
        ids.append(i)
    if len(set(ids)) != len(ids) or len(ids) < 2:
        raise UserError(f"{where}: a teacher needs at least 2 distinct classes, got {classes}")
    return tuple(ids)


def _accuracy(model: torch.nn.Module, split, classes: tuple[int, ...], spec, per_class: int = 100) -> float:
    from ..data.transforms import normalize

    rows = np.concatenate([split.indices_of(c)[:per_class] for c in classes])
    position = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([position[int(label)] for label in split.labels[rows]])
    x = normalize(torch.from_numpy(split.images[rows]), spec, "cpu")
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


def import_teachers(src: str | Path, zoo_dir: str | Path, dataset: str, arch: str, data_root: str | Path,
                    width: float = 1.0, classes_file: str | Path | None = None) -> list[TeacherRecord]:
    """Import every checkpoint in ``src`` into the (new or imported) zoo ``zoo_dir``; returns its records."""
    src, zoo_dir = Path(src).resolve(), Path(zoo_dir).resolve()
    if not src.is_dir():
        raise UserError(f"import: {src} is not a folder of teacher checkpoints")
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise UserError(f"import: {src} holds no {' or '.join(SUFFIXES)} files")
    BACKBONES.get(arch, option="--arch")
    given = _read_classes(Path(classes_file) if classes_file else None)
    spec = get_spec(dataset)
    ensure_dataset(data_root, dataset)
    split = load_split(data_root, dataset, "meta_train")
    zoo_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(zoo_dir / ".lock", f"zoo {zoo_dir}"):
        existing = read_manifest(zoo_dir, missing_ok=True)
        if any(not is_imported(r) for r in existing):
            raise UserError(f"import: {zoo_dir} is a zoo this engine trained; import into a new folder")
        records = list(existing)
        for path in files:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"import: {path} is not a weights-only checkpoint ({type(e).__name__})") from None
            state, classes = obj, given.get(path.name)
            if isinstance(obj, dict) and "teacher" in obj:            # the seeds' format
                state = obj["teacher"]
                classes = classes or [int(c) for c in obj.get("specific") or []]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise UserError(f"import: {path} holds no state dict of tensors")
            if not classes:
                raise UserError(f"import: {path}: its classes are unknown; list them with --classes")
            ids = _class_ids(classes, split.class_names, f"import: {path.name}")
            if "fc.weight" in state and "conv1.weight" in state:
                state = _torchvision_to_ours(state)
            model = build_model(arch, num_classes=len(ids), image_size=spec.image_size, width=width)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)[:200]
                raise UserError(f"import: {path} does not fit {arch} (width {width}, {len(ids)}-way): {first}") from None
            model.eval()
            tid = len(records)
            fname = f"teacher_{tid:04d}.pt"
            with atomic_path(zoo_dir / fname) as tmp:
                torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
            acc = _accuracy(model, split, ids, spec)
            records.append(TeacherRecord(tid, spec.name, arch, width, spec.image_size, ids, round(acc, 6),
                                         IMPORTED_SEED, 0, fname, sha256_file(zoo_dir / fname)))
            print(f"{path.name} -> {fname}: {arch}, classes {list(ids)}, accuracy {acc:.3f} on their "
                  "meta-train images")
        write_manifest(zoo_dir, records)
    return records


__all__ = ["import_teachers", "is_imported"]
