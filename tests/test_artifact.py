"""The run's meta-model as an artifact: model.pt + model.json, used through raydfml.load_meta_model."""
import json
from pathlib import Path

import pytest
import torch

import raydfml
from raydfml.config import resolve
from raydfml.errors import UserError


@pytest.fixture(scope="module")
def finished_run(smoke_root, tmp_path_factory):
    from raydfml.experiment import run_experiment

    cfg = resolve("mr", "deepinv", "smoke", {"data.data_root": str(smoke_root), "runtime.workers": 0,
                                             "train.baselines": "random_init"})
    cfg.out = str(tmp_path_factory.mktemp("artifact") / "run")
    results = run_experiment(cfg, progress=False)
    return cfg, Path(results["run_dir"])


def test_model_file_is_the_selected_meta_model_weights_only(finished_run):
    cfg, run_dir = finished_run
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    best = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["meta"]["best_params"]
    spec = json.loads((run_dir / "model.json").read_text())
    assert spec["backbone"]["arch"] == cfg.learner.arch and spec["way"] == cfg.train.way
    assert spec["learner"]["name"] == cfg.learner.name and cfg.data.dataset in spec["normalization"]
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert set(state) == set(best) and all(torch.equal(state[n], best[n].cpu()) for n in state)


def test_loaded_model_predicts_as_the_engines_meta_test(finished_run):
    """Adapting the artifact on raw uint8 support images gives the per-task accuracies of the engine's
    own meta-test (same parameters, same normalisation, same test-time adaptation)."""
    from raydfml.data.episodes import EpisodeSampler
    from raydfml.evaluation import evaluate
    from raydfml.runtime.parts import build_learner_for, build_meta_model, meta_split

    cfg, run_dir = finished_run
    split = meta_split(cfg, cfg.data.dataset, "meta_test")
    model = raydfml.load_meta_model(run_dir)
    engine = evaluate(build_learner_for(cfg, build_meta_model(cfg)), model.params, split, way=5, shot=5,
                      query=5, tasks=4, seed=7)
    sampler = EpisodeSampler(split, way=5, shot=5, query=5, seed=7)
    mine = []
    for i in range(4):
        ep = sampler.episode(i)
        predicted = model.adapt(ep.support, ep.support_labels).predict(ep.query)
        assert predicted.shape == ep.query_labels.shape and predicted.max() < 5
        mine.append(100.0 * (predicted == ep.query_labels).float().mean().item())
    assert mine == pytest.approx(engine.per_task, abs=1e-6)


def test_bad_inputs_and_files_are_one_line_errors(finished_run, tmp_path):
    _, run_dir = finished_run
    model = raydfml.load_meta_model(run_dir)
    x = torch.rand(10, 3, 32, 32)
    with pytest.raises(UserError, match="cover 0..4"):
        model.adapt(x, torch.zeros(10, dtype=torch.long))
    with pytest.raises(UserError, match=r"\[N, C, H, W\]"):
        model.adapt(torch.rand(10, 32, 32), torch.arange(5).repeat(2))
    with pytest.raises(UserError, match="does not exist"):
        raydfml.load_meta_model(tmp_path)
    (tmp_path / "model.json").write_text((run_dir / "model.json").read_text())
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a weights file"):
        raydfml.load_meta_model(tmp_path)
    with pytest.raises(UserError, match="not one this model was trained on"):
        raydfml.load_meta_model(run_dir, dataset="nope")


def test_the_model_is_used_without_the_engines_training_code(finished_run, tmp_path):
    """A fresh interpreter loads, adapts and predicts; no runtime, method, synthesis, config or Ray module
    is imported on the way."""
    import subprocess
    import sys

    _, run_dir = finished_run
    script = f"""
import sys, torch, raydfml
model = raydfml.load_meta_model({str(run_dir)!r})
support = torch.randint(0, 256, (10, 3, 48, 48), dtype=torch.uint8)         # another size: resized
pred = model.adapt(support, torch.arange(5).repeat(2)).predict(torch.rand(7, 1, 32, 32))   # grey: 3 channels
assert pred.shape == (7,) and int(pred.max()) < 5
training = [m for m in sys.modules if m == "ray" or m.startswith(("raydfml.runtime", "raydfml.methods",
            "raydfml.synthesis", "raydfml.experiment", "raydfml.config", "raydfml.zoo", "ray."))]
assert not training, training
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_results_record_their_provenance(finished_run):
    import raydfml

    cfg, run_dir = finished_run
    prov = json.loads((run_dir / "results.json").read_text())["provenance"]
    assert prov["version"] == raydfml.__version__ and prov["dataset"] == [cfg.data.dataset]
    assert prov["backbones"] == {"teachers": list(cfg.pool.archs), "meta_model": cfg.learner.arch}
    assert prov["learner"] == cfg.learner.name
    assert prov["zoos"] and all(len(h) == 64 for h in prov["zoos"].values())
    assert prov["git_commit"] is None or len(prov["git_commit"].split("+")[0]) == 40
    md = (run_dir / "results.md").read_text()
    assert f"Dataset {cfg.data.dataset}; teachers conv4; meta-model conv4 with {cfg.learner.name}" in md


def test_recovered_image_galleries_and_per_teacher_accuracy(finished_run):
    import pandas as pd
    from PIL import Image

    _, run_dir = finished_run
    pngs = sorted((run_dir / "gallery").glob("round*_teacher*.png"))
    assert pngs
    with Image.open(pngs[0]) as im:
        assert im.size[0] > 200 and im.size[1] > 100
    metrics = pd.read_csv(run_dir / "metrics.csv")
    per_teacher = [c for c in metrics.columns if c.startswith("synth/teacher_acc_by_id/")]
    assert per_teacher and metrics[per_teacher].notna().sum().sum() >= len(metrics)


def test_a_cosine_protonet_is_loaded_with_its_metric(tmp_path):
    """The artifact keeps ProtoNet's prediction rule: a model meta-trained with learner.metric=cosine
    predicts as the engine's learner with that metric, not with the Euclidean default."""
    from raydfml.artifact import save_meta_model
    from raydfml.runtime.parts import build_learner_for, build_meta_model

    cfg = resolve("mr", "deepinv", "smoke", {"learner.name": "protonet", "learner.metric": "cosine",
                                             "learner.metric_scale": 5.0})
    torch.manual_seed(0)
    learner = build_learner_for(cfg, build_meta_model(cfg))
    params = {n: p.detach() for n, p in learner.model.named_parameters()}
    save_meta_model(tmp_path, params, cfg)
    model = raydfml.load_meta_model(tmp_path)
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.rand(10, 3, model.image_size, model.image_size, generator=g), \
        torch.rand(6, 3, model.image_size, model.image_size, generator=g)
    ys = torch.arange(5).repeat(2)
    x_s, x_q = model._prepare(xs), model._prepare(xq)
    expected = learner.predict(params, x_s, ys, x_q)
    assert torch.allclose(model.adapt(xs, ys).logits(xq), expected)
    euclidean = build_learner_for(resolve("mr", "deepinv", "smoke", {"learner.name": "protonet"}), learner.model)
    assert not torch.allclose(euclidean.predict(params, x_s, ys, x_q), expected)
    assert model._learner.metric == "cosine" and model._learner.metric_scale == 5.0
