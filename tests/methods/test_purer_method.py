"""PURER in the engine: the dataset's Adam steps per round, and the hardening through the learner."""
from __future__ import annotations

import torch
from method_rounds import method_cfg, one_round, pool_classes


def test_purer_takes_data_steps_adam_steps_of_its_dataset_per_round(ma_pool, tmp_path):
    from raydfml.runtime.executor import InProcessExecutor

    root, entries = ma_pool
    for steps in (1, 3):
        cfg = method_cfg(root, "purer", 0, **{"purer.data_steps": steps})
        ex = InProcessExecutor(cfg, entries, pool_classes(entries))
        dataset = ex.meta.method.dataset
        before = dataset.images().clone()
        one_round(cfg, ex, entries, 0, tmp_path, teachers=[0, 5])
        state = dataset.optimizer.state[dataset.logits]
        assert int(state["step"]) == steps and not torch.equal(dataset.images(), before)


def test_purer_hardening_maximises_the_learners_own_query_loss(ma_pool):
    """The adversarial closure is minus the learner's outer loss (ProtoNet: through its prototypes),
    differentiable w.r.t. the synthetic images."""
    from raydfml.runtime.meta_learner import MetaLearner

    root, entries = ma_pool
    cfg = method_cfg(root, "purer", 0, **{"learner.name": "protonet"})
    ml = MetaLearner(cfg.to_dict(), pool_classes(entries), device="cpu", load_val=False)
    images = torch.sigmoid(ml.method.dataset.logits)
    loss = ml.method._adversarial_loss(ml, images)
    grad, = torch.autograd.grad(loss, ml.method.dataset.logits)
    assert loss.item() < 0 and grad.abs().sum() > 0


def test_a_purer_run_writes_galleries_captioned_by_the_teachers_own_labels(smoke_root, tmp_path, monkeypatch):
    """PURER's images live in the MetaLearner's dataset, not in per-teacher records. In the rounds the
    driver logs (the first and every train.eval_every) the teachers of the round's last data step send
    back the rows they inverted against with their own label and confidence, and each becomes
    gallery/round<r>_teacher<t>.png: checked against the teacher itself, reloaded from the zoo."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from raydfml.config import resolve
    from raydfml.data.registry import get_spec
    from raydfml.experiment import run_experiment
    from raydfml.report import RunReport, gallery_size
    from raydfml.runtime.pool import existing_pool
    from raydfml.synthesis.base import make_normalizer
    from raydfml.zoo import load_teacher

    galleries = []                  # (round, record, path) of every save_gallery call
    save_gallery = RunReport.save_gallery

    def spy(self, round, rec, *args, **kwargs):
        path = save_gallery(self, round, rec, *args, **kwargs)
        galleries.append((round, rec, path))
        return path

    monkeypatch.setattr(RunReport, "save_gallery", spy)
    cfg = resolve("mr", "purer", "smoke", {"data.data_root": str(smoke_root), "runtime.workers": 0,
                                           "runtime.device": "cpu", "train.baselines": []})
    cfg.out = str(tmp_path / "run")
    run_dir = Path(run_experiment(cfg, progress=False)["run_dir"])

    t = cfg.train
    logged = [r for r in range(t.rounds) if r == 0 or (r + 1) % t.eval_every == 0]
    assert sorted({r for r, _, _ in galleries}) == logged == [0, 1, 3]
    assert all(path is not None for _, _, path in galleries)
    assert sorted(p.name for p in (run_dir / "gallery").glob("*.png")) == sorted(p.name for _, _, p in galleries)
    assert len(galleries) == len(logged) * min(2, t.teachers_per_round)

    entries = existing_pool(cfg)
    spec = get_spec(cfg.data.dataset)
    way, per_class = cfg.pool.way, cfg.synth.per_class
    for r, rec, path in galleries:
        assert path.name == f"round{r:04d}_teacher{rec.teacher}.png"
        with Image.open(path) as im:            # save_gallery's layout: 6 columns, one row per class
            assert im.format == "PNG" and im.size == gallery_size(6, way)
        entry = entries[rec.teacher]
        assert rec.classes == entry.global_classes                        # the teacher's classes' rows
        size = entry.record.image_size
        assert rec.images.shape == (way * per_class, 3, size, size)
        np.testing.assert_array_equal(rec.labels, np.repeat(np.arange(way), per_class))
        # The captions are that teacher's own label and confidence for exactly these images.
        teacher = load_teacher(entry.zoo_dir, entry.record)
        x = make_normalizer(spec.mean, spec.std, "cpu")(torch.as_tensor(rec.images).float())
        with torch.no_grad():
            probs = torch.softmax(teacher(x), dim=1)
        np.testing.assert_array_equal(rec.predicted, probs.argmax(1).numpy())
        np.testing.assert_allclose(rec.confidence, probs.max(1).values.numpy(), rtol=1e-5, atol=1e-6)
