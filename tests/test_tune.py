"""Ray Tune sweeps: sweep files, the smoke sweep end to end, and interrupt + restore."""
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
import yaml

from raydfml.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p for p in (REPO / "tune_configs").glob("*.yaml") if not p.name.startswith("cluster_"))


@pytest.fixture(scope="session")
def sweep_data(tmp_path_factory):
    """The smoke glyph set and its zoo, built once (test_cluster.py uses the same directory)."""
    from raydfml.config import resolve
    from raydfml.data.layout import ensure_dataset
    from raydfml.runtime.pool import prepare_pool

    root = tmp_path_factory.getbasetemp() / "raydfml-sweep-data"
    root.mkdir(exist_ok=True)
    ensure_dataset(root, "glyphs-smoke")
    prepare_pool(resolve("mr", "deepinv", "smoke", {"data.data_root": str(root)}), workers=0, progress=False)
    return root


def _env():
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TQDM_DISABLE="1")


# ----------------------------------------------------------------------------- sweep files
@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_sweep_files_resolve(path):
    from raydfml.tune import build_scheduler, load_sweep, param_space, trial_points

    sweep = load_sweep(path)
    assert sweep.name and sweep.metric == "val_acc"
    assert trial_points(sweep)
    param_space(sweep)
    build_scheduler(sweep)


def test_shipped_sweeps_cover_the_issue():
    from raydfml.tune import load_sweep

    sweeps = {p.stem: load_sweep(p) for p in SWEEPS}
    lr = [s for s in sweeps.values() if any(k.endswith("_lr") for k in s.space) and "method" not in s.space]
    assert lr, "a learning-rate sweep for one method"
    # (a grid over both becomes one joint grid of the pairs that can run: black-box scenarios refuse the
    # white-box methods)
    from raydfml.tune.sweep import PAIR

    assert any({"scenario", "method"} <= set(s.space) or PAIR in s.space for s in sweeps.values()), \
        "a method x scenario sweep"


def test_grid_all_expands_to_every_registered_preset(tmp_path):
    from raydfml.config import SCENARIOS
    from raydfml.methods import METHODS, method_names
    from raydfml.tune import load_sweep, trial_points

    from raydfml.errors import UserError

    sweep = load_sweep(_write(tmp_path, {"profile": "smoke", "space": {"scenario": {"grid": ["mr", "ma", "md"]},
                                                                       "method": {"choice": "all"}}}))
    white_box = [m for m in method_names() if not METHODS.get(m).black_box]
    assert sweep.space == {"scenario": {"grid": ["mr", "ma", "md"]}, "method": {"choice": method_names()}}
    assert len(trial_points(sweep)) == 3 * len(method_names())
    # every scenario (the black-box ones run only black-box methods): a grid over both is one grid of the
    # pairs that run; a grid of one with a choice of the other cannot leave the others out (one line)
    both = load_sweep(_write(tmp_path, {"profile": "smoke", "space": {"scenario": {"grid": "all"},
                                                                      "method": {"grid": "all"}}}))
    assert len(trial_points(both)) == 3 * len(method_names()) + (len(SCENARIOS) - 3) * (len(method_names()) - len(white_box))
    with pytest.raises(UserError, match="cannot run") as err:
        load_sweep(_write(tmp_path, {"profile": "smoke", "space": {"scenario": {"grid": "all"},
                                                                   "method": {"choice": "all"}}}))
    assert "\n" not in str(err.value)


def test_grid_all_skips_scenarios_a_method_does_not_run_in(tmp_path):
    """A method registered for scenario mr only: {grid: all} over scenarios x methods leaves out its
    ma and md trials (one joint grid of the compatible pairs), and every remaining trial resolves."""
    from raydfml.config import SCENARIOS, compatible
    from raydfml.methods import METHODS, TeacherRecovery, method_names, register_method
    from raydfml.tune import load_sweep, trial_points
    from raydfml.tune.sweep import point_dims

    @register_method("mr_only_toy")
    class MrOnly(TeacherRecovery):
        scenarios = ("mr",)
        preset = {"synth.name": "pixel"}

    try:
        sweep = load_sweep(_write(tmp_path, {"profile": "smoke", "space": {"scenario": {"grid": "all"},
                                                                           "method": {"grid": "all"}}}))
        pairs = [(d["scenario"], d["method"]) for d in (point_dims(sweep, p) for p in trial_points(sweep))]
        assert ("mr", "mr_only_toy") in pairs
        assert ("ma", "mr_only_toy") not in pairs and ("md", "mr_only_toy") not in pairs
        # every compatible pair once (the black-box scenarios ss/sh/mh also leave out the white-box methods)
        expected = [(s, m) for s in SCENARIOS for m in method_names() if compatible(s, m)]
        assert sorted(pairs) == sorted(expected)
        assert {s for s, m in expected if m == "mr_only_toy"} == {"mr"}
        only_one = load_sweep(_write(tmp_path, {"scenario": "ma", "profile": "smoke",
                                                "space": {"method": {"grid": "all"}}}))
        assert "mr_only_toy" not in only_one.space["method"]["grid"]
    finally:
        METHODS.unregister("mr_only_toy")


def test_smoke_sweep_shape():
    from raydfml.tune import load_sweep, trial_points, trial_shares

    sweep = load_sweep(REPO / "tune_configs" / "smoke.yaml")
    points = trial_points(sweep)
    assert len({p["method"] for p in points}) >= 2 and len({p["learner.outer_lr"] for p in points}) >= 2
    assert sweep.scheduler["name"] == "asha" and sweep.max_concurrent_trials == 2
    sh = trial_shares(sweep, cluster_gpus=1.0)
    assert sh["trial_cpus"] + sh["n_actors"] * sh["actor_cpus"] <= 1.0     # two trials fit 2 CPUs
    assert 0 < sh["gpu_share"] * (sh["n_actors"] + 1) <= 0.5              # and share one GPU


def _write(tmp_path, doc) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


BASE = {"profile": "smoke", "space": {"method": {"grid": ["deepinv", "purer"]}}}


@pytest.mark.parametrize("change,needle", [
    ({"schedular": "asha"}, "schedular"),
    ({"space": {"learner.inner_lrr": {"grid": [0.1]}}}, "learner.inner_lrr"),
    ({"space": {"method": {"grid": ["nope"]}}}, "nope"),
    ({"space": {"learner.inner_lr": [0.1, 0.2]}}, "grid"),
    ({"space": {"learner.inner_lr": {"logunif": [0.1, 0.2]}}}, "logunif"),
    ({"space": {"learner.inner_lr": {"uniform": [0.1]}}}, "uniform"),
    ({"space": {"pool.epochs": {"randint": [1, 3]}}}, "pool.epochs"),
    ({"search_alg": "optuna"}, "grid"),
    ({"scheduler": "nope"}, "nope"),
    ({"resources": {"cpus": 1}}, "cpus"),
    ({"set": {"runtime.workers": 2}}, "resources"),
    ({"seed": "x"}, "seed"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, change, needle):
    from raydfml.tune import load_sweep

    with pytest.raises(UserError, match=None) as exc:
        load_sweep(_write(tmp_path, {**BASE, **change}))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["optuna", "hyperopt"])
def test_missing_search_backend_names_its_extra(monkeypatch, name):
    import importlib.util

    from raydfml.tune import Sweep, build_search_alg

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    with pytest.raises(UserError) as exc:
        build_search_alg(Sweep(name="x", search_alg={"name": name}))
    assert f'pip install -e ".[{name}]"' in str(exc.value)


def test_bad_tune_input_on_the_command_line(tmp_path):
    for args, needle in [(["--tune", str(tmp_path / "none.yaml")], "none.yaml"),
                         (["--tune", str(REPO / "tune_configs" / "smoke.yaml"), "--storage", str(tmp_path), "--resume"],
                          "--resume")]:
        proc = subprocess.run([sys.executable, str(REPO / "launch.py"), *args], capture_output=True, text=True,
                              env=_env(), timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]


# ----------------------------------------------------------------------------- sweeps on Ray
def test_smoke_sweep_writes_one_table_of_all_trials(sweep_data, ray_session, tmp_path):
    """2 methods x 2 outer learning rates, ASHA, 2 trials at once, actors inside each trial's group."""
    from raydfml.tune import run_sweep

    t0 = time.time()
    out = run_sweep(str(REPO / "tune_configs" / "smoke.yaml"), storage=str(tmp_path / "sweeps"), quiet=True,
                    overrides={"data.data_root": str(sweep_data)})
    wall = time.time() - t0
    assert wall <= 180, f"smoke sweep took {wall:.0f}s"
    assert out["complete"] and out["errors"] == 0
    exp = Path(out["experiment_path"])
    assert exp.is_absolute() and exp == (tmp_path / "sweeps" / "smoke")
    df = pd.read_csv(exp / "trials.csv")
    assert len(df) == 4
    assert set(df["method"]) == {"deepinv", "purer"} and set(df["learner.outer_lr"]) == {0.001, 0.003}
    for col in ["scenario", "status", "stopped_early", "val_acc", "test_acc_1shot", "test_ci95_1shot",
                "test_acc_5shot", "test_ci95_5shot", "wall_s", "rounds_done"]:
        assert col in df.columns, col
    done = df[df["status"] == "completed"]
    assert len(done) >= 1 and set(df["status"]) <= {"completed", "stopped early"}   # ASHA may stop any but the first
    assert (done["rounds_done"] == 4).all() and done["test_acc_1shot"].between(0, 100).all()
    assert (df["stopped_early"] == (df["status"] == "stopped early")).all()
    assert (df.loc[df["stopped_early"], "rounds_done"] < 4).all()
    assert df["val_acc"].notna().all() and (df["wall_s"] > 0).all()
    md = (exp / "trials.md").read_text()
    assert "test 5-way 1-shot" in md and "±" in md and "Best by val_acc" in md
    best = json.loads((exp / "best.json").read_text())
    assert best["config"]["method"] in ("deepinv", "purer") and best["command"].startswith("python launch.py")
    assert best["val_acc"] == pytest.approx(df["val_acc"].max())
    for trial_dir in df["trial_dir"]:
        trial_dir = Path(trial_dir)
        assert list(trial_dir.glob("events.out.tfevents.*")), "Tune's TensorBoard log per trial"
        first = json.loads((trial_dir / "result.json").read_text().splitlines()[0])
        assert first["actors_in_trial_pg"] == 1.0, "MetaLearner/TeacherPool actors left the trial's group"
        assert (trial_dir / "run" / "metrics.csv").is_file()
    for trial_dir in done["trial_dir"]:
        assert json.loads((Path(trial_dir) / "run" / "results.json").read_text())["meta_test"]


INTERRUPT = {
    "name": "interrupt", "profile": "smoke", "method": "deepinv",
    "set": {"train.eval_every": 1, "train.val_tasks": 3, "train.test_tasks": 4, "train.baselines": []},
    # Trial 0 finishes first; trial 2 (6 rounds) is still running or pending when the sweep is interrupted.
    "space": {"train.rounds": {"grid": [2, 3, 6]}},
    "max_concurrent_trials": 2, "scheduler": "fifo",
    "resources": {"workers": 1, "trial_cpus": 0.25, "actor_cpus": 0.35},
}


def _final_trials(exp: Path) -> dict[str, str]:
    """trial dir -> its result.json text, for trials whose last report carries the final meta-test."""
    out = {}
    for res in exp.glob("trial_*/result.json"):
        text = res.read_text()
        if any(json.loads(line).get("final") for line in text.splitlines() if line.strip()):
            out[res.parent.name] = text
    return out


def test_interrupted_sweep_restores_without_rerunning_finished_trials(sweep_data, tmp_path):
    sweep = tmp_path / "interrupt.yaml"
    sweep.write_text(yaml.safe_dump(INTERRUPT))
    storage = tmp_path / "sweeps"
    exp = storage / "interrupt"
    cmd = [sys.executable, str(REPO / "launch.py"), "--tune", str(sweep), "--storage", str(storage),
           "--data-root", str(sweep_data), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    deadline, finished = time.time() + 240, {}
    while time.time() < deadline and proc.poll() is None:
        finished = _final_trials(exp)
        if finished:
            time.sleep(1.0)          # let Tune record the finished trial in its experiment state
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.5)
    log, _ = proc.communicate(timeout=120)
    assert finished, "no trial finished before the deadline:\n" + log[-3000:]
    assert proc.returncode == 1, log[-3000:]                 # interrupted: not every trial finished
    first = pd.read_csv(exp / "trials.csv")
    assert (first["status"] == "unfinished").any(), first.to_string()
    finished = _final_trials(exp)                            # as saved at the interrupt
    before = {name: (exp / name / "run" / "metrics.csv").read_text() for name in finished}

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    df = pd.read_csv(exp / "trials.csv")
    assert len(df) == 3 and (df["status"] == "completed").all(), df.to_string()
    assert sorted(df["rounds_done"]) == [2, 3, 6]
    for name, text in finished.items():                      # finished trials were not run again
        assert (exp / name / "result.json").read_text() == text
        assert (exp / name / "run" / "metrics.csv").read_text() == before[name]
    for trial_dir in df["trial_dir"]:                        # each round reported once, in order
        rounds = [json.loads(ln)["round"] for ln in (Path(trial_dir) / "result.json").read_text().splitlines()
                  if ln.strip()]
        assert rounds == list(range(len(rounds)))
        metrics = pd.read_csv(Path(trial_dir) / "run" / "metrics.csv")
        assert metrics["round"].tolist() == list(range(len(metrics)))
    # a resume with another option is refused in one line (it was silently ignored), nothing rerun
    changed = subprocess.run([*cmd, "--set", "learner.outer_lr=0.5", "--resume"], capture_output=True, text=True,
                             env=_env(), timeout=300)
    assert changed.returncode == 2 and "started with other options" in changed.stderr, changed.stderr[-2000:]
    assert pd.read_csv(exp / "trials.csv").equals(df)
