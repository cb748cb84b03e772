"""End to end: launch.py's smoke profile on the embedded data, on Ray and in-process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raydfml.cli import build_config, parse_args

REPO = Path(__file__).resolve().parents[1]


def _cfg(root, out, *extra):
    return build_config(parse_args(["--scenario", "mr", "--profile", "smoke", "--data-root", str(root),
                                    "--out", str(out), "--quiet", *extra]))


def _run(root, out, *extra, **kw):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--scenario", "mr", "--profile", "smoke",
                             "--data-root", str(root), "--out", str(out), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_smoke_run_on_ray_writes_a_complete_run_directory(smoke_root, ray_session, tmp_path):
    from raydfml.experiment import run_experiment

    cfg = _cfg(smoke_root, tmp_path / "run", "--workers", "2")
    results = run_experiment(cfg, progress=False)
    run = tmp_path / "run"
    saved = json.loads((run / "results.json").read_text())
    assert saved["scenario"] == "mr" and saved["method"] == "deepinv" and saved["profile"] == "smoke"
    assert {(r["way"], r["shot"]) for r in saved["meta_test"]} == {(5, 1), (5, 5)}
    assert set(saved["baselines"]) == {"random_init", "teacher_average", "with_data", "with_data_pool"}
    from raydfml.diagnostics import gain_recovered

    assert saved["recovered"] == gain_recovered(saved["meta_test"], saved["baselines"])   # the yardstick
    ds = saved["coverage"]["glyphs-smoke"]
    assert 0 < ds["covered"] <= ds["classes"] == 10                   # the smoke set's meta-train classes
    assert "pool coverage" in (run / "results.md").read_text()
    for rec in saved["meta_test"] + [r for recs in saved["baselines"].values() for r in recs]:
        assert rec["tasks"] == cfg.train.test_tasks and 0 <= rec["accuracy"] <= 100 and rec["ci95"] >= 0
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["round"].tolist() == list(range(cfg.train.rounds))
    assert (metrics["teachers/conv4"] == cfg.train.teachers_per_round).all()
    assert metrics["val/acc"].notna().any() and (metrics["synth/teacher_acc"] > 0).all()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "meta_val.png").is_file()
    assert "random_init" in (run / "results.md").read_text()
    assert results["wall_s"] > 0


def test_same_seed_in_process_gives_identical_meta_test(smoke_root, tmp_path):
    from raydfml.experiment import run_experiment

    a = run_experiment(_cfg(smoke_root, tmp_path / "a", "--workers", "0", "--seed", "3"), progress=False)
    b = run_experiment(_cfg(smoke_root, tmp_path / "b", "--workers", "0", "--seed", "3"), progress=False)
    assert a["meta_test"] == b["meta_test"]
    assert a["baselines"] == b["baselines"]


def _train_on_ray(root, out, on_round_end=None) -> dict:
    """train() of the smoke run on Ray (2 TeacherPool actors) into ``out``; ``on_round_end`` injects faults."""
    from raydfml.report import RunReport
    from raydfml.runtime.driver import train
    from raydfml.runtime.pool import existing_pool

    cfg = _cfg(root, out, "--workers", "2")
    report = RunReport(out, cfg.to_dict())
    try:
        return train(cfg, out, report, progress=False, entries=existing_pool(cfg), on_round_end=on_round_end)
    finally:
        report.close()


@pytest.fixture(scope="module")
def clean_ray_run(smoke_root, ray_session, tmp_path_factory):
    """The undisturbed smoke run on Ray that both actor-kill tests must end at exactly (run once for the
    module: a smoke run on Ray is the slowest thing here)."""
    return _train_on_ray(smoke_root, tmp_path_factory.mktemp("clean-ray"))


def _same_params(a: dict, b: dict) -> bool:
    import torch

    return all(torch.equal(a["best_params"][n], b["best_params"][n]) for n in a["best_params"])


def test_teacher_pool_actor_killed_mid_run_is_replaced(smoke_root, ray_session, clean_ray_run, tmp_path):
    import ray

    killed = []

    def kill_after_round_one(r, metrics, executor):
        if r == 1:
            ray.kill(executor.pools[0], no_restart=True)
            killed.append(r)

    out = _train_on_ray(smoke_root, tmp_path / "run", on_round_end=kill_after_round_one)
    assert killed == [1] and out["actors_replaced"] >= 1
    rounds = _cfg(smoke_root, tmp_path / "run").train.rounds
    assert pd.read_csv(tmp_path / "run" / "metrics.csv")["round"].tolist() == list(range(rounds))
    assert _same_params(clean_ray_run, out)           # ... ending with exactly an undisturbed run's parameters


def test_meta_learner_killed_mid_run_is_replaced_from_its_checkpoint(smoke_root, ray_session, clean_ray_run,
                                                                    tmp_path):
    """Fault injection: the MetaLearner actor dies after round 1's checkpoint; the run replaces it,
    reloads the checkpoint and ends with exactly the parameters of an uninterrupted run."""
    import ray

    killed = []

    def kill_meta(r, metrics, executor):
        if r == 1 and not killed:
            ray.kill(executor.meta, no_restart=True)
            killed.append(r)

    out = _train_on_ray(smoke_root, tmp_path / "killed", on_round_end=kill_meta)
    assert killed == [1] and out["actors_replaced"] >= 1
    rounds = _cfg(smoke_root, tmp_path / "killed").train.rounds
    assert pd.read_csv(tmp_path / "killed" / "metrics.csv")["round"].tolist() == list(range(rounds))
    assert _same_params(clean_ray_run, out)


def test_sigkill_then_resume_continues_from_checkpoint(smoke_root, tmp_path):
    out = tmp_path / "run"
    rounds = ["--set", "train.rounds=12", "--workers", "0"]
    proc = _run(smoke_root, out, *rounds)
    ckpt = out / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and (out / "metrics.csv").is_file():
            rows = pd.read_csv(out / "metrics.csv")
            if len(rows) >= 2:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = int(rows["round"].max())
                break
        time.sleep(0.2)
    assert killed_at is not None, "the run finished or stalled before it could be killed"
    assert not (out / "results.json").exists()
    resumed = _run(smoke_root, out, *rounds, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    line = next(l for l in stdout.splitlines() if l.startswith("resuming from the checkpoint of round"))
    start = int(line.split("continuing at round ")[1])
    assert start >= killed_at >= 1
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["round"].tolist() == list(range(12))      # no gaps, no duplicates
    assert json.loads((out / "results.json").read_text())["meta_test"]


@pytest.mark.parametrize("args,needle", [
    (["--method", "nope"], "--method"),
    (["--set", "learner.nope=1"], "learner.nope"),
    (["--resume"], "--resume"),
    (["--dataset", "imagenet"], "imagenet"),
])
def test_bad_input_gives_one_line_and_exit_2(smoke_root, tmp_path, args, needle):
    proc = _run(smoke_root, tmp_path / "run", "--workers", "0", *args)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], stderr
    assert not (tmp_path / "run" / "results.json").exists()
