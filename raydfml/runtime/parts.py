"""Building the method's parts from a config: meta-model + learner, synthesizer.

The one place where names in the config become objects, shared by the TeacherPool and the
MetaLearner so both sides build identical meta-models.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
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
                         kd_weight=lc.kd_weight, ce_weight=lc.ce_weight, temperature=lc.temperature)


def build_synthesizer(cfg: ExperimentConfig):
    """The per-teacher synthesizer of the method; None for PURER, whose dataset lives in the MetaLearner."""
    sc = cfg.synth
    if sc.name == "pixel":
        from ..synthesis.pixel import PixelInversion

        return PixelInversion(image_size=image_size(cfg), per_class=sc.per_class, steps=sc.steps, lr=sc.lr_pixel)
    if sc.name == "generator":
        from ..synthesis.deepinv import GeneratorInversion

        return GeneratorInversion(image_size=image_size(cfg), per_class=sc.per_class, steps=sc.steps,
                                  lr_generator=sc.lr_generator, lr_latent=sc.lr_latent, bn_weight=sc.bn_weight,
                                  ce_weight=sc.ce_weight, augment=sc.augment, nz=sc.nz, ngf=sc.ngf)
    return None


def task_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (experiment seed, round, teacher, ...), stable across processes."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)
