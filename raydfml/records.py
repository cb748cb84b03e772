"""What crosses the actor boundary: typed records instead of string-keyed dicts.

A TeacherPool actor returns one ``TeacherRecord`` per teacher and phase of a round. Arrays are numpy
(what Ray's object store serialises without copies); the MetaLearner turns them into tensors on its
device. ``TeacherRecord.summary()`` is the same record without its arrays: the driver plans rounds
and logs metrics from summaries, while the full records (recovered images, gradients, tasks) go from
the TeacherPool to the MetaLearner by object reference, never through the driver.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class TaskArrays:
    """A teacher's task (``learners.Task``) as numpy arrays: support and query images (augmented and
    normalised as the meta-model sees them), labels, and the teacher's logits on exactly those images."""
    x_support: np.ndarray
    y_support: np.ndarray
    x_query: np.ndarray
    y_query: np.ndarray
    t_support: np.ndarray | None = None
    t_query: np.ndarray | None = None

    @classmethod
    def from_task(cls, task) -> "TaskArrays":
        return cls(**{f.name: _numpy(getattr(task, f.name)) for f in dataclasses.fields(cls)})

    def to_task(self, device):
        from .learners import Task

        return Task(**{f.name: _tensor(getattr(self, f.name), device) for f in dataclasses.fields(self)})


@dataclass
class TeacherRecord:
    """One teacher's work in one phase of a round.

    Which fields are set depends on the phase: a recovery sets the images and their statistics; a
    per-teacher step adds ``grad`` (flat, float32, the meta-model's parameter order) and ``loss``, or
    ``task`` when the aggregation rule works on tasks; FREE's and PURER's teacher work adds
    ``state_grad`` (the gradient for the central synthesizer state); TGR's embedding adds ``embedding``.
    """
    teacher: int                               # position in the pool (PoolEntry.index)
    arch: str = ""
    classes: tuple[int, ...] = ()              # global class ids; label j <-> classes[j]
    images: np.ndarray | None = None           # float16 [n, 3, S, S] in [0, 1]
    labels: np.ndarray | None = None           # int64, relative 0..way-1
    predicted: np.ndarray | None = None        # int64 per image: the teacher's own label for it (argmax)
    confidence: np.ndarray | None = None       # float32 per image: the teacher's softmax probability of it
    teacher_acc: float = math.nan              # the teacher's accuracy on its recovered images
    inv_loss: float = math.nan                 # the recovery's final inversion loss
    passes: int = 0                            # teacher forward+backward passes spent
    seconds: float = 0.0                       # wall time of the teacher work
    grad: np.ndarray | None = None             # flat gradient for the meta-model
    loss: float = math.nan                     # the teacher's task loss where ``grad`` was taken
    accuracy: float = math.nan                 # the meta-model's accuracy on that task (when measured)
    task: TaskArrays | None = None
    state_grad: np.ndarray | None = None       # flat gradient for the central synthesizer state
    embedding: np.ndarray | None = None        # TGR: the teacher's task embedding
    queries: dict | None = None                # black-box teachers: {api: {"calls": int, "images": int}} this work cost

    _ARRAYS = ("images", "labels", "predicted", "confidence", "grad", "task", "state_grad", "embedding")

    def summary(self) -> "TeacherRecord":
        """This record without its arrays (what the driver needs to plan and log)."""
        return dataclasses.replace(self, **{name: None for name in self._ARRAYS})

    @property
    def recovered(self) -> bool:
        return self.images is not None


def merge(parts: Sequence[Sequence[TeacherRecord]]) -> list[TeacherRecord]:
    """The records of a round's shares, in teacher order: nothing downstream (FREE's sequential
    alignment above all) may depend on how many actors shared the round."""
    return sorted((r for part in parts for r in part), key=lambda r: r.teacher)


def _numpy(v):
    return None if v is None else v.detach().cpu().numpy()


def _tensor(v, device):
    return None if v is None else torch.from_numpy(np.asarray(v).copy()).to(device)


__all__ = ["TaskArrays", "TeacherRecord", "merge"]
