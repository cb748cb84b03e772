"""Real meta-train episodes as a task source: the with-data baseline's, and ``train.source=real``.

Episode ``k`` is a pure function of the config and ``k`` (one dataset: its seeded sampler's episode
``k``; md: domain ``k % D``, that domain's episode ``k // D``, so every meta-batch mixes domains
evenly), so the source's whole state is the counter ``k``: a resumed run continues with the episode
it would have drawn next.
"""
from __future__ import annotations

from ..config import ExperimentConfig
from ..data.episodes import Episode, EpisodeSampler
from ..utils import task_seed
from .parts import meta_split
from .pool import class_offset, pool_datasets


class RealEpisodes:
    """Seeded real meta-train episodes of the pool's datasets; ``classes`` (dataset -> class ids)
    restricts each dataset to those classes (a dataset with fewer than an episode's ways, ``learner.train_way``
    or ``train.way``, is left out)."""

    def __init__(self, cfg: ExperimentConfig, classes: dict[str, list[int]] | None = None):
        lc = cfg.learner
        datasets = list(pool_datasets(cfg))
        seeds = {d: task_seed(cfg.seed, 31, i) if i else task_seed(cfg.seed, 31) for i, d in enumerate(datasets)}
        if classes is not None:
            datasets = [d for d in datasets if len(classes.get(d, ())) >= cfg.episode_way]
        self.datasets = datasets
        self.splits = [meta_split(cfg, d, "meta_train") for d in datasets]
        self.offsets = [class_offset(cfg, d) for d in datasets]
        self.samplers = [EpisodeSampler(split, way=cfg.episode_way, shot=lc.train_shot, query=lc.train_query,
                                        seed=seeds[d], classes=None if classes is None else classes[d])
                         for d, split in zip(datasets, self.splits)]
        self.k = 0                      # episodes drawn so far

    def episode(self, k: int) -> tuple[int, Episode]:
        """``(dataset index, episode)`` of episode ``k``."""
        d = k % len(self.splits)
        return d, self.samplers[d].episode(k // len(self.splits))

    def next(self) -> tuple[int, Episode]:
        out = self.episode(self.k)
        self.k += 1
        return out

    def global_classes(self, d: int, episode: Episode) -> tuple[int, ...]:
        """The episode's classes as pool-wide ids (the bank's and the task weighting's keys)."""
        return tuple(int(c) + self.offsets[d] for c in episode.classes)

    def state_dict(self) -> dict:
        return {"k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = int(state["k"])


__all__ = ["RealEpisodes"]
