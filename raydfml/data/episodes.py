"""N-way K-shot Q-query episodes drawn from an in-memory split.

Episode ``i`` of a sampler depends only on ``(seed, i)`` (``np.random.default_rng([seed, i])``), so a
fixed evaluation set of tasks is reproducible, independent of how many episodes were drawn before,
and can be split across Ray workers by index without coordination. Images stay ``uint8``;
normalisation happens on the device (``transforms.normalize``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError
from .layout import ImageSplit


@dataclass
class Episode:
    """One task. Support and query are class-major (all shots of class 0, then class 1, ...)."""

    support: torch.Tensor          # uint8 [way*shot, 3, S, S]
    support_labels: torch.Tensor   # int64 [way*shot], relative 0..way-1
    query: torch.Tensor            # uint8 [way*query, 3, S, S]
    query_labels: torch.Tensor     # int64 [way*query]
    classes: torch.Tensor          # int64 [way], class ids within the split; relative label r is classes[r]
    support_indices: torch.Tensor  # int64, rows of the split (for tracing and tests)
    query_indices: torch.Tensor

    @property
    def way(self) -> int:
        return len(self.classes)

    def to(self, device, non_blocking: bool = True) -> "Episode":
        return Episode(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


class EpisodeSampler:
    """Draws episodes: ``way`` classes without replacement, then ``shot + query`` distinct images per
    class, the first ``shot`` as support and the rest as query (so support and query are disjoint).

    ``query=0`` gives support-only episodes. Iterating a sampler is an endless stream from index 0;
    use :meth:`episodes` for a finite one.
    """

    def __init__(self, split: ImageSplit, way: int = 5, shot: int = 1, query: int = 15, seed: int = 0,
                 classes: "list[int] | None" = None):
        if way < 1 or shot < 1 or query < 0:
            raise UserError(f"episodes need way >= 1, shot >= 1 and query >= 0, got way={way} shot={shot} query={query}")
        where = f"{split.spec.name}/{split.split}"
        # ``classes``: draw only from these class ids of the split (the with-data reference restricted to
        # the classes a teacher pool covers); None: every class.
        self.classes = None if classes is None else np.asarray(sorted({int(c) for c in classes}), dtype=np.int64)
        if self.classes is not None and (len(self.classes) == 0 or self.classes.min() < 0
                                         or self.classes.max() >= split.num_classes):
            raise UserError(f"episodes from {where}: class ids {list(classes)[:8]} are not among its "
                            f"{split.num_classes} classes")
        available = split.num_classes if self.classes is None else len(self.classes)
        if way > available:
            raise UserError(f"{way}-way episodes need {way} classes but {where} has {available}"
                            + (" of the requested ones" if self.classes is not None else ""))
        need = shot + query
        counts = split.class_counts()
        short = np.flatnonzero(counts < need)
        if len(short):
            c = int(short[0])
            more = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
            raise UserError(f"class {split.class_names[c]!r} of {where} has {int(counts[c])} images, fewer than "
                            f"shot+query = {shot}+{query} = {need}{more}")
        self.split, self.way, self.shot, self.query, self.seed = split, way, shot, query, seed

    def indices(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split rows of episode ``index``: ``classes [way]``, ``support [way, shot]``, ``query [way, query]``."""
        rng = np.random.default_rng([self.seed, index])
        if self.classes is None:
            classes = rng.choice(self.split.num_classes, size=self.way, replace=False)
        else:
            classes = self.classes[rng.choice(len(self.classes), size=self.way, replace=False)]
        rows = np.stack([
            (idx := self.split.indices_of(int(c)))[rng.choice(len(idx), size=self.shot + self.query, replace=False)]
            for c in classes])
        return classes.astype(np.int64), rows[:, :self.shot], rows[:, self.shot:]

    def episode(self, index: int) -> Episode:
        classes, sup, qry = self.indices(index)
        sup, qry = sup.reshape(-1), qry.reshape(-1)
        images = self.split.images
        return Episode(
            support=torch.from_numpy(images[sup]),
            support_labels=torch.arange(self.way).repeat_interleave(self.shot),
            query=torch.from_numpy(images[qry]),
            query_labels=torch.arange(self.way).repeat_interleave(self.query),
            classes=torch.from_numpy(classes),
            support_indices=torch.from_numpy(sup.astype(np.int64)),
            query_indices=torch.from_numpy(qry.astype(np.int64)),
        )

    def episodes(self, n: int, start: int = 0) -> Iterator[Episode]:
        """Episodes ``start .. start+n-1``."""
        for i in range(start, start + n):
            yield self.episode(i)

    def __iter__(self) -> Iterator[Episode]:
        i = 0
        while True:
            yield self.episode(i)
            i += 1
