"""The task memory bank: per global class, a ring of recovered images; N-way tasks across teachers.

Images are kept in memory as float16 in [0, 1] pixel space (the seeds wrote uint8 PNGs to disk and
re-read them for every task, bug B19). Tasks combine classes recovered from different teachers,
which works because every teacher's outputs are mapped to global class ids.
"""
from __future__ import annotations

import numpy as np
import torch


class TaskMemoryBank:
    def __init__(self, per_class: int = 200):
        self.per_class = per_class
        self._rings: dict[int, torch.Tensor] = {}   # class id -> [<=per_class, 3, S, S] float16
        self._next: dict[int, int] = {}             # ring write position per class
        self._agree: dict[int, torch.Tensor] = {}   # class id -> int8 per image: 1 teacher agrees, 0 disputes, -1 unknown

    def __len__(self) -> int:
        return sum(len(r) for r in self._rings.values())

    @property
    def classes(self) -> list[int]:
        return sorted(self._rings)

    def count(self, c: int) -> int:
        return len(self._rings.get(c, ()))

    def add(self, images: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...],
            agree: torch.Tensor | None = None) -> None:
        """Add a teacher's recovered images; ``labels`` are relative, ``classes[j]`` is label j's global id.
        ``agree`` (optional, per image) says whether the teacher itself predicts the image's label: the
        bank keeps it beside each image for the diagnostics (``disputed_share``)."""
        images = torch.as_tensor(images).to(torch.float16)
        labels = torch.as_tensor(labels)
        flags = (torch.full((len(labels),), -1, dtype=torch.int8) if agree is None
                 else torch.as_tensor(agree).to(torch.int8))
        for j, c in enumerate(classes):
            new, new_flags = images[labels == j], flags[labels == j]
            if len(new) == 0:
                continue
            ring, ring_flags = self._rings.get(c), self._agree.get(c)
            if ring is None or len(ring) < self.per_class:
                ring = new if ring is None else torch.cat([ring, new])
                ring_flags = new_flags if ring_flags is None else torch.cat([ring_flags, new_flags])
                if len(ring) > self.per_class:        # keep the newest
                    ring, ring_flags = ring[-self.per_class:], ring_flags[-self.per_class:]
                self._rings[c], self._agree[c] = ring, ring_flags
                self._next[c] = len(ring) % self.per_class
            else:                                      # full: overwrite the oldest slots
                pos = self._next[c]
                for img, flag in zip(new[-self.per_class:], new_flags[-self.per_class:]):
                    ring[pos], ring_flags[pos] = img, flag
                    pos = (pos + 1) % self.per_class
                self._next[c] = pos

    def disputed_share(self) -> float:
        """The share of banked images whose label their teacher disputes (its own prediction differs),
        among those where it is known; NaN when none is."""
        known = [f[f >= 0] for f in self._agree.values()]
        n = sum(len(k) for k in known)
        return float("nan") if n == 0 else float(sum(int((k == 0).sum()) for k in known)) / n

    def ready_classes(self, min_images: int) -> list[int]:
        return [c for c in self.classes if self.count(c) >= min_images]

    def sample_task(self, way: int, shot: int, query: int, rng: np.random.Generator):
        """(x_support, y_support, x_query, y_query, classes) with x float32 in [0,1], or None if too few classes.

        Classes with at least shot+query images are preferred; if fewer than ``way`` such classes exist,
        classes with at least 2 images are used and images are drawn with replacement.
        """
        ready = self.ready_classes(shot + query)
        replace = False
        if len(ready) < way:
            ready, replace = self.ready_classes(2), True
            if len(ready) < way:
                return None
        chosen = rng.choice(ready, size=way, replace=False)
        xs, xq = [], []
        for c in chosen:
            ring = self._rings[int(c)]
            if replace:
                s = rng.choice(len(ring), size=shot, replace=True)
                q = rng.choice(len(ring), size=query, replace=True)
            else:
                perm = rng.permutation(len(ring))[: shot + query]
                s, q = perm[:shot], perm[shot:]
            xs.append(ring[torch.as_tensor(s)])
            xq.append(ring[torch.as_tensor(q)])
        y_s = torch.arange(way).repeat_interleave(shot)
        y_q = torch.arange(way).repeat_interleave(query)
        return (torch.cat(xs).float(), y_s, torch.cat(xq).float(), y_q, tuple(int(c) for c in chosen))

    def state_dict(self) -> dict:
        return {"per_class": self.per_class, "rings": {int(c): r.clone() for c, r in self._rings.items()},
                "next": dict(self._next), "agree": {int(c): a.clone() for c, a in self._agree.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.per_class = int(state["per_class"])
        self._rings = {int(c): r.clone() for c, r in state["rings"].items()}
        self._next = {int(c): int(p) for c, p in state["next"].items()}
        agree = state.get("agree") or {}
        self._agree = {c: agree[c].clone() if c in agree else torch.full((len(r),), -1, dtype=torch.int8)
                       for c, r in self._rings.items()}
