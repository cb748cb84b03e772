"""The teacher-pool manifest and safe teacher loading.

A zoo directory holds one state-dict file per teacher (``teacher_<id>.pt``) and ``manifest.csv``
with one row per teacher. ``classes`` lists the teacher's global class ids (ids of the dataset's
meta-train split, sorted-name order); the teacher's output j is class ``classes[j]``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..models import build_model
from ..utils import atomic_path, sha256_file

MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class TeacherRecord:
    teacher_id: int
    dataset: str
    arch: str
    width: float
    image_size: int
    classes: tuple[int, ...]
    heldout_acc: float
    seed: int
    epochs: int
    file: str          # relative to the zoo directory
    sha256: str

    @property
    def way(self) -> int:
        return len(self.classes)


COLUMNS = [f.name for f in dataclasses.fields(TeacherRecord)]


def _to_row(r: TeacherRecord) -> dict:
    row = dataclasses.asdict(r)
    row["classes"] = " ".join(str(c) for c in r.classes)
    return row


def write_manifest(zoo_dir: str | Path, records: list[TeacherRecord]) -> Path:
    import pandas as pd   # lazy: the teacher-training workers import this module and never need it

    path = Path(zoo_dir) / MANIFEST
    df = pd.DataFrame([_to_row(r) for r in sorted(records, key=lambda r: r.teacher_id)], columns=COLUMNS)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return path


def read_manifest(zoo_dir: str | Path, missing_ok: bool = False) -> list[TeacherRecord]:
    path = Path(zoo_dir) / MANIFEST
    if not path.is_file():
        if missing_ok:
            return []
        raise UserError(f"{path}: no teacher manifest here; build a zoo with python -m raydfml.zoo")
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype={"classes": str, "sha256": str, "file": str, "dataset": str, "arch": str})
    except Exception as exc:  # pandas raises many kinds
        raise UserError(f"{path}: cannot read manifest ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
    records = []
    for row in df.to_dict("records"):
        try:
            records.append(TeacherRecord(
                teacher_id=int(row["teacher_id"]), dataset=str(row["dataset"]), arch=str(row["arch"]),
                width=float(row["width"]), image_size=int(row["image_size"]),
                classes=tuple(int(c) for c in str(row["classes"]).split()), heldout_acc=float(row["heldout_acc"]),
                seed=int(row["seed"]), epochs=int(row["epochs"]), file=str(row["file"]), sha256=str(row["sha256"])))
        except (TypeError, ValueError) as exc:
            raise UserError(f"{path}: bad row for teacher {row.get('teacher_id')!r} ({exc})") from None
    return records


def build_teacher_module(record: TeacherRecord) -> nn.Module:
    return build_model(record.arch, num_classes=record.way, image_size=record.image_size, width=record.width,
                       track_bn_stats=True)


def load_teacher_state(zoo_dir: str | Path, record: TeacherRecord, verify: bool = True) -> dict[str, torch.Tensor]:
    """Read a teacher's state dict, checking its checksum and that it fits the manifest's architecture."""
    path = Path(zoo_dir) / record.file
    if not path.resolve().is_relative_to(Path(zoo_dir).resolve()):
        raise UserError(f"{Path(zoo_dir) / 'manifest.csv'}: teacher {record.teacher_id}'s file {record.file!r} is "
                        "outside the zoo folder; a manifest names files inside it")
    if not path.is_file():
        raise UserError(f"{path}: teacher file listed in the manifest is missing")
    if verify and sha256_file(path) != record.sha256:
        raise UserError(f"{path}: sha256 does not match the manifest (file changed or corrupt); rebuild the zoo")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: cannot load teacher weights ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict of tensor weights")
    module = build_teacher_module(record)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UserError(f"{path}: weights do not fit architecture {record.arch!r} (width {record.width}, "
                        f"{record.way}-way) named in the manifest") from None
    return state


def load_teacher(zoo_dir: str | Path, record: TeacherRecord, device: str | torch.device = "cpu",
                 verify: bool = True) -> nn.Module:
    """A teacher as an eval-mode module on ``device`` (BN running statistics intact, grads off)."""
    module = build_teacher_module(record)
    module.load_state_dict(load_teacher_state(zoo_dir, record, verify))
    module.eval().requires_grad_(False)
    return module.to(device)
