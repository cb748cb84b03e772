"""Scenario md on real data mixes resolutions: CIFAR-FS at 32 px with miniImageNet at 84 px.

The meta-model, the synthesizers and the bank work at the largest size; each teacher sees its
inputs resized to the size it was trained at; every row the meta-model meets is normalised with its
own dataset's statistics, in training as at meta-test. Real datasets are stood in for by tiny fakes
in the seeds' layout (tests/fake_real_data.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydfml.config import resolve
from raydfml.data.registry import get_spec
from raydfml.models import NativeResolution, resize
from raydfml.runtime.parts import image_size, meta_split

from fake_real_data import write_fake_dataset

DOMAINS = ("cifarfs", "miniimagenet")


def _cfg(root, **over):
    overrides = {"data.domains": DOMAINS, "data.data_root": str(root), "runtime.workers": 0,
                 "runtime.device": "cpu", "pool.num_per_arch": 2, **over}
    return resolve("md", "free", "smoke", overrides)


@pytest.fixture(scope="module")
def mixed_pool(tmp_path_factory):
    """Fake CIFAR-FS (32 px) and miniImageNet (84 px) and an md smoke pool of 2 conv4 teachers each."""
    from raydfml.runtime.pool import prepare_pool

    root = tmp_path_factory.mktemp("mixed-data")
    for seed, name in enumerate(DOMAINS):
        write_fake_dataset(root, name, seed)
    cfg = _cfg(root)
    return cfg, prepare_pool(cfg, workers=0, progress=False)


def test_working_resolution_is_the_largest_domain_size(tmp_path):
    assert image_size(_cfg(tmp_path)) == 84
    assert image_size(_cfg(tmp_path, **{"data.domains": ("cifarfs", "fc100")})) == 32
    assert image_size(_cfg(tmp_path, **{"data.image_size": 48})) == 48


def test_teachers_keep_their_native_size_and_see_resized_inputs(mixed_pool):
    from raydfml.runtime.teacher_pool import TeacherPool

    cfg, entries = mixed_pool
    assert [(e.dataset, e.record.image_size) for e in entries] == [("cifarfs", 32)] * 2 + [("miniimagenet", 84)] * 2
    pool = TeacherPool(cfg.to_dict(), entries, device="cpu")
    cifar, mini = pool.teacher(0), pool.teacher(2)
    assert isinstance(cifar, NativeResolution) and cifar.size == 32
    assert not isinstance(mini, NativeResolution)
    x = torch.rand(3, 3, 84, 84, requires_grad=True)
    out = cifar(x)
    assert torch.allclose(out, cifar.net(resize(x, 32)))
    out.sum().backward()                    # inversion differentiates through the resize
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_resize_commutes_with_per_channel_normalisation():
    x = torch.rand(2, 3, 84, 84)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    assert torch.allclose(resize((x - mean) / std, 32), (resize(x, 32) - mean) / std, atol=1e-5)


def test_each_row_is_normalised_with_its_class_dataset(mixed_pool):
    from raydfml.runtime.meta_learner import MetaLearner

    cfg, _ = mixed_pool
    meta = MetaLearner(cfg.to_dict(), [0, 1000], device="cpu", load_val=False)
    x = torch.full((4, 3, 8, 8), 0.6)
    out = meta.normalize(x, torch.tensor([0, 1, 1, 0]), (3, 1003))     # class 3 of CIFAR-FS, class 3 of mini
    for row, name in [(0, "cifarfs"), (1, "miniimagenet"), (2, "miniimagenet"), (3, "cifarfs")]:
        s = get_spec(name)
        want = (0.6 - torch.tensor(s.mean)) / torch.tensor(s.std)
        assert torch.allclose(out[row, :, 0, 0], want), (row, name)
    assert get_spec("cifarfs").mean != get_spec("miniimagenet").mean


def test_free_round_over_both_resolutions_banks_working_size_images(mixed_pool):
    """One FREE round on a 32-px and an 84-px teacher: both recover images the teacher labels, both
    tasks enter the bank at 84 px under their own domain's class ids, and replay runs on them."""
    from raydfml.runtime.meta_learner import MetaLearner
    from raydfml.runtime.teacher_pool import TeacherPool

    cfg, entries = mixed_pool
    classes = sorted({c for e in entries for c in e.global_classes})
    meta = MetaLearner(cfg.to_dict(), classes, device="cpu")
    assert {d: s.images.shape[-1] for d, s in meta.val_splits.items()} == {"cifarfs": 84, "miniimagenet": 84}
    pool = TeacherPool(cfg.to_dict(), entries, device="cpu")
    _, records = pool.work("adapt", 0, [0, 2], None, meta.central("generator_state", 0), meta.flat_params(), "task")
    assert [r.images.shape[-1] for r in records] == [84, 84]
    for r in records:
        assert 0.0 <= r.teacher_acc <= 1.0 and np.isfinite(r.inv_loss)
    meta.central("generator_step", 0, (False,), records)
    meta.bank_records(records)
    assert np.isfinite(meta.aggregate(0, records)["kd/loss"])
    assert {c // 1000 for c in meta.bank.classes} == {0, 1}
    assert all(meta.bank._rings[c].shape[-1] == 84 for c in meta.bank.classes)
    stats = meta.replay(0, 1)
    assert np.isfinite(stats["replay/loss"])


def test_real_splits_reach_the_meta_model_at_the_working_size(mixed_pool):
    cfg, _ = mixed_pool
    split = meta_split(cfg, "cifarfs", "meta_test")
    assert split.images.shape[-2:] == (84, 84) and split.spec.name == "cifarfs"


def test_meta_test_scores_each_domain_at_the_working_size(mixed_pool):
    from raydfml.baselines import evaluate_final, random_init_params

    cfg, _ = mixed_pool
    cfg = _cfg(cfg.data.data_root, **{"train.baselines": "random_init", "learner.name": "protonet"})
    res = evaluate_final(cfg, {"best_params": random_init_params(cfg), "meta_updates": 0}, [], progress=False)
    assert list(res["meta_test_domains"]) == list(DOMAINS)
    for recs in res["meta_test_domains"].values():
        assert [(r["shot"], r["tasks"]) for r in recs[cfg.method]] == [(1, 10), (5, 10)]
