"""The meta-model's parts from a config: working resolution, real splits, meta-model, learner.

Shared by the TeacherPool, the MetaLearner and the baselines so every side builds identical
meta-models. (Synthesizers, aggregation rules and methods are built from their registries.)
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ExperimentConfig
from ..data.layout import load_split
from ..data.registry import get_spec
from ..models import build_model
from .pool import pool_datasets


def image_size(cfg: ExperimentConfig) -> int:
    """The meta-model's working resolution: ``data.image_size``, else the largest native size of the
    pool's datasets (md on real data: CIFAR-FS 32 px + miniImageNet/CUB 84 px -> 84).

    Everything the meta-model sees is at this size: recovered images, the task memory bank, the real
    meta-val/meta-test/with-data episodes (``meta_split``). Each teacher sees its inputs resized to
    the size it was trained at (``TeacherPool.teacher``, ``models.NativeResolution``).
    """
    if cfg.data.image_size:
        return int(cfg.data.image_size)
    return max(get_spec(d).image_size for d in pool_datasets(cfg))


def meta_split(cfg: ExperimentConfig, dataset: str, split: str):
    """A real split as the meta-model sees it: ``dataset``'s images at the working resolution."""
    return load_split(Path(cfg.data.data_root).resolve(), dataset, split, image_size=image_size(cfg))


def build_meta_model(cfg: ExperimentConfig) -> torch.nn.Module:
    lc = cfg.learner
    return build_model(lc.arch, num_classes=cfg.train.way, image_size=image_size(cfg), width=lc.width,
                       track_bn_stats=False, adaptive_pool=lc.adaptive_pool)


def build_learner_for(cfg: ExperimentConfig, model: torch.nn.Module):
    from ..learners import build_learner

    lc = cfg.learner
    return build_learner(lc.name, model, inner_lr=lc.inner_lr, inner_steps=lc.inner_steps,
                         test_inner_steps=lc.test_inner_steps, first_order=lc.first_order,
                         kd_weight=lc.kd_weight, ce_weight=lc.ce_weight, temperature=lc.temperature,
                         distill_via=lc.distill_via, joint_bn=lc.joint_bn,
                         metric=lc.metric, metric_scale=lc.metric_scale)
