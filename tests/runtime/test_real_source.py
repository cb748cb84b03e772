"""train.source=real: meta-training on real episodes with the same learner, rules and checkpoints."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raydfml.config import resolve

REPO = Path(__file__).resolve().parents[2]


def _cfg(root, **over):
    return resolve("mr", "deepinv", "smoke", {"data.data_root": str(root), "runtime.workers": 0,
                                              "train.source": "real", **over})


@pytest.mark.e2e
def test_uniform_real_training_is_exactly_the_with_data_baseline(smoke_root, tmp_path):
    """Same initialisation, episodes, Adam and meta-updates: the run's last parameters equal the
    with-data baseline trained for its number of meta-updates; no teachers are built or loaded."""
    from raydfml.baselines import train_with_data
    from raydfml.experiment import run_experiment

    cfg = _cfg(smoke_root)
    cfg.out = str(tmp_path / "run")
    res = run_experiment(cfg, progress=False)
    tr = cfg.train
    assert res["method"] == "real" and res["source"] == "real" and "coverage" not in res
    assert res["meta_updates"] == tr.rounds * (tr.replay_batches + tr.kd_steps)
    assert set(res["baselines"]) == {"random_init", "with_data"}          # no pool: no teacher average
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["meta"]["params"]
    with_data = train_with_data(cfg, res["meta_updates"], torch.device("cpu"))
    assert all(torch.equal(last[n], with_data[n]) for n in with_data)
    metrics = (tmp_path / "run" / "metrics.csv").read_text()
    assert "synth/" not in metrics and "bank/" not in metrics


@pytest.mark.e2e
def test_real_training_with_weighting_logs_and_reports_the_weights(smoke_root, tmp_path):
    import pandas as pd
    from raydfml.experiment import run_experiment

    cfg = _cfg(smoke_root, **{"aggregate.weighting": "uncertainty", "weighting.lr": 0.1, "weighting.start": 1})
    cfg.out = str(tmp_path / "run")
    res = run_experiment(cfg, progress=False)
    weights = res["weights"]["replay"]
    assert all(k.startswith("c") for k in weights) and sum(weights.values()) / len(weights) == pytest.approx(1.0)
    m = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert m["weight/replay/spread"].isna()[0] and (m["weight/replay/spread"][1:] > 1).all()   # from round 1 on
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["meta"]
    assert ck["real"]["k"] == res["meta_updates"] * cfg.learner.meta_batch
    assert set(ck["weighting"]["replay"]["adam"]) == set(weights)


def _launch(root, out, *extra):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, str(REPO / "launch.py"), "--scenario", "mr", "--profile", "smoke",
                           "--data-root", str(root), "--out", str(out), "--quiet", "--workers", "0",
                           "--set", "train.source=real", *extra], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("breakage,needle", [("missing_split", "meta_train.csv"), ("corrupt_image", "corrupt or unreadable image")])
def test_a_broken_meta_train_split_is_one_line_before_any_training(smoke_root, tmp_path, breakage, needle):
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root, ignore=shutil.ignore_patterns("zoo"))
    shutil.rmtree(root / "glyphs-smoke" / ".cache", ignore_errors=True)
    if breakage == "missing_split":
        (root / "glyphs-smoke" / "split" / "meta_train.csv").unlink()
    else:
        image = next((root / "glyphs-smoke" / "meta_train").rglob("*.png"))
        image.write_bytes(b"not a png")
    proc = _launch(root, tmp_path / "run")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "results.json").exists()
    assert not (root / "zoo").exists()                        # real episodes need no teachers


def test_resume_refuses_another_source_or_weighting(smoke_root, tmp_path):
    from raydfml.errors import UserError
    from raydfml.experiment import run_dir_for

    run = tmp_path / "run"
    cfg = _cfg(smoke_root, **{"aggregate.weighting": "spsa"})
    cfg.out = str(run)
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"round": 0}, run / "checkpoints" / "last.pt")
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    run_dir_for(cfg, resume=True)                             # the same options resume
    for over in ({"aggregate.weighting": "spsa_track"}, {"train.source": "teachers", "aggregate.weighting": "spsa"}):
        other = _cfg(smoke_root, **over)
        other.out = str(run)
        with pytest.raises(UserError, match="started with other options"):
            run_dir_for(other, resume=True)


@pytest.mark.e2e
def test_recoveries_read_back_from_the_synth_cache_give_the_same_run(smoke_root, tmp_path, monkeypatch):
    """runtime.synth_cache: a second run recovers nothing (the synthesizer is never called) and ends
    with the same parameters and meta-test; a run with another weighting reads the same recoveries."""
    from raydfml.experiment import run_experiment
    from raydfml.runtime.teacher_pool import TeacherPool

    def cfg(name, **over):
        c = resolve("mr", "deepinv", "smoke", {"data.data_root": str(smoke_root), "runtime.workers": 0,
                                               "runtime.synth_cache": str(tmp_path / "cache"), **over})
        c.out = str(tmp_path / name)
        return c

    first = run_experiment(cfg("first"), progress=False)
    c = cfg("first")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == c.train.rounds * c.train.teachers_per_round

    def no_synthesis(self):
        raise AssertionError("the synthesizer ran although every recovery is cached")
    monkeypatch.setattr(TeacherPool, "synthesizer", property(no_synthesis))
    second = run_experiment(cfg("second"), progress=False)
    assert second["meta_test"] == first["meta_test"] and second["baselines"] == first["baselines"]
    p1, p2 = (torch.load(tmp_path / n / "checkpoints" / "last.pt", weights_only=True)["meta"]["params"]
              for n in ("first", "second"))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    run_experiment(cfg("weighted", **{"aggregate.weighting": "spsa"}), progress=False)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == c.train.rounds * c.train.teachers_per_round
