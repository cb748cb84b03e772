"""``launch.py --method a,b``: several methods on one pool, one table with the shared baselines."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from raydfml.cli import main

REPO = Path(__file__).resolve().parents[1]
METHODS = ["deepinv", "purer"]
# The smoke profile shrunk further: 2 rounds, 2 inversion steps, 6 meta-test tasks.
SHRINK = ["--set", "train.rounds=2", "--set", "train.eval_every=1", "--set", "train.val_tasks=2",
          "--set", "train.test_tasks=6", "--set", "synth.steps=2"]


def _argv(root, out, *extra):
    return ["--scenario", "mr", "--method", ",".join(METHODS), "--profile", "smoke", "--workers", "0",
            "--data-root", str(root), "--out", str(out), "--quiet", *SHRINK, *extra]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The smoke glyph set with its zoo built (as a warm cache would have it)."""
    from raydfml.data.layout import ensure_dataset

    root = tmp_path_factory.mktemp("compare-data")
    ensure_dataset(root, "glyphs-smoke")
    return root


def _run_spied(argv) -> SimpleNamespace:
    """``main(argv)`` in-process, recording every evaluate_final call and every meta-test's task set."""
    import raydfml.baselines as baselines_mod
    import raydfml.evaluation as evaluation_mod

    finals, task_sets = [], []
    real_final, real_evaluate = baselines_mod.evaluate_final, evaluation_mod.evaluate

    def final_spy(cfg, trained, entries, progress=True, **kw):
        res = real_final(cfg, trained, entries, progress, **kw)
        finals.append({"method": cfg.method if trained is not None else None, "baselines": sorted(res["baselines"]),
                       "with_data_updates": kw.get("with_data_updates")})
        return res

    def evaluate_spy(learner, params, split, **kw):
        task_sets.append((split.spec.name, split.split, len(split.labels), kw["way"], kw["shot"], kw["query"],
                          kw["tasks"], kw["seed"]))
        return real_evaluate(learner, params, split, **kw)

    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(buf):
        mp.setattr(baselines_mod, "evaluate_final", final_spy)
        mp.setattr(evaluation_mod, "evaluate", evaluate_spy)
        rc = main(argv)
    return SimpleNamespace(rc=rc, stdout=buf.getvalue(), finals=finals, task_sets=task_sets)


@pytest.fixture(scope="module")
def compared(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    run = _run_spied(_argv(data_root, out))
    run.out = out
    run.json = json.loads((out / "comparison.json").read_text())
    return run


def test_one_table_with_every_method_then_every_baseline(compared):
    assert compared.rc == 0
    rows = ["deepinv", "purer", "random_init", "teacher_average", "with_data", "with_data_pool"]
    lines = compared.stdout.splitlines()
    headers = [i for i, ln in enumerate(lines) if "5-way 1-shot" in ln]
    assert len(headers) == 1, compared.stdout                      # one table, not one per method
    assert all(c in lines[headers[0]] for c in ("5-way 5-shot", "meta-updates", "wall (s)", "recovered"))
    table = lines[headers[0] + 2: headers[0] + 2 + len(rows)]      # header, index-name line, rows
    assert [ln.split()[0] for ln in table] == rows
    assert all("±" in ln for ln in table)

    comp = compared.json
    assert comp["methods"] == METHODS and list(comp["baselines"]) == rows[2:]
    updates = {m: comp["runs"][m]["meta_updates"] for m in METHODS}
    assert all(u > 0 for u in updates.values())
    assert comp["baseline_info"]["with_data"]["meta_updates"] == max(updates.values())
    assert any("for its own number of meta-updates" in n for n in comp["notes"])
    md = (compared.out / "comparison.md").read_text()
    assert all(f"| {r}" in md for r in rows) and "for its own number of meta-updates" in md
    from raydfml.diagnostics import gain_recovered

    for m in METHODS:      # the yardstick: each method's share of its own with-data references' gain
        res = json.loads((compared.out / m / "results.json").read_text())
        assert comp["runs"][m]["recovered"] == gain_recovered(res["meta_test"], res["baselines"])
    csv = pd.read_csv(compared.out / "comparison.csv")
    assert csv["model"].drop_duplicates().tolist() == rows
    assert csv.groupby("model").size().eq(2).all()                 # 1-shot and 5-shot per row
    assert csv.loc[csv["kind"] == "method", "model"].unique().tolist() == METHODS
    from PIL import Image

    with Image.open(compared.out / "comparison.png") as png:         # the bar chart with CIs
        assert png.size[0] > 300 and png.size[1] > 200


def test_methods_and_baselines_are_scored_on_the_same_tasks(compared):
    # random_init and teacher_average are evaluated once; with_data(_pool) in each method's own run, for
    # its own number of meta-updates
    calls = compared.finals
    assert [c["method"] for c in calls if c["method"]] == METHODS
    assert sum("random_init" in c["baselines"] for c in calls) == 1
    assert sum("teacher_average" in c["baselines"] for c in calls) == 1
    with_data = [c for c in calls if "with_data" in c["baselines"]]
    assert [c["method"] for c in with_data] == METHODS
    assert all({"with_data", "with_data_pool"} <= set(c["baselines"]) for c in with_data)
    # every meta-test cell (2 methods + 2 shared baselines + 2 x 2 with-data) x (1, 5 shots) drew the same
    # tasks per shot
    meta_test = [t for t in compared.task_sets if t[1] == "meta_test"]     # (meta-val also calls evaluate)
    assert len(meta_test) == 8 * 2
    by_shot = {}
    for t in meta_test:
        by_shot.setdefault(t[4], set()).add(t)
    assert sorted(by_shot) == [1, 5] and all(len(s) == 1 for s in by_shot.values())
    comp = compared.json
    recs = [r for m in METHODS for r in comp["runs"][m]["meta_test"]]
    recs += [r for rs in comp["baselines"].values() for r in rs]
    assert {(r["way"], r["shot"], r["tasks"]) for r in recs} == {(5, 1, 6), (5, 5, 6)}


def test_each_method_writes_its_own_complete_run_directory(compared):
    comp = compared.json
    for m in METHODS:
        run = compared.out / m
        res = json.loads((run / "results.json").read_text())
        assert res["method"] == m and res["run_dir"] == str(run.resolve())
        assert res["meta_test"] == comp["runs"][m]["meta_test"]
        assert res["meta_updates"] == comp["runs"][m]["meta_updates"]
        # the shared baselines are copied in; with_data(_pool) are the method's own (its meta-updates)
        shared = {k: comp["baselines"][k] for k in ("random_init", "teacher_average")}
        assert {k: res["baselines"][k] for k in shared} == shared
        assert set(res["baselines"]) == {*shared, "with_data", "with_data_pool"}
        assert res["recovered"] == comp["runs"][m]["recovered"]
        assert json.loads((run / "config.json").read_text())["method"] == m
        assert pd.read_csv(run / "metrics.csv")["round"].tolist() == [0, 1]
        assert (run / "checkpoints" / "last.pt").is_file() and (run / "results.md").is_file()


def test_resume_reads_finished_methods_back_and_continues_the_unfinished(compared, data_root, tmp_path):
    out = tmp_path / "cmp"
    shutil.copytree(compared.out, out)
    (out / "purer" / "results.json").unlink()          # purer interrupted after its last checkpoint
    (out / "comparison.json").unlink()
    deepinv_before = (out / "deepinv" / "results.json").read_bytes()

    run = _run_spied(_argv(data_root, out, "--resume"))
    assert run.rc == 0
    assert "[1/2] deepinv: finished earlier" in run.stdout and "[2/2] purer: resuming" in run.stdout
    assert "resuming from the checkpoint of round 1" in run.stdout
    assert (out / "deepinv" / "results.json").read_bytes() == deepinv_before
    # only purer's meta-test and its with-data references ran again: the shared baselines were read back
    assert [c["method"] for c in run.finals if c["method"]] == ["purer"]
    assert not any("random_init" in c["baselines"] for c in run.finals)
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["runs"]["deepinv"]["state"] == "done" and comp["runs"]["purer"]["state"] == "resume"
    for m in METHODS:                                   # same checkpoint, same tasks: same numbers
        assert comp["runs"][m]["meta_test"] == compared.json["runs"][m]["meta_test"]
    assert comp["baselines"] == compared.json["baselines"]


def test_resume_with_other_options_is_refused(compared, data_root, tmp_path):
    from raydfml.errors import UserError

    out = tmp_path / "cmp"
    shutil.copytree(compared.out, out)
    with pytest.raises(UserError, match=r"train.rounds=2 there, 3 now"):
        main(_argv(data_root, out, "--resume", "--set", "train.rounds=3"))


def test_a_finished_comparison_is_not_overwritten(compared, data_root):
    from raydfml.errors import UserError

    with pytest.raises(UserError, match="--resume"):
        main(_argv(data_root, compared.out))


def test_methods_whose_presets_change_the_learner_are_refused(tmp_path):
    from raydfml.compare import run_comparison
    from raydfml.config import resolve
    from raydfml.errors import UserError

    a, b = resolve("mr", "deepinv", "smoke"), resolve("mr", "purer", "smoke")
    b.learner.name = "protonet"
    with pytest.raises(UserError, match="learner.name"):
        run_comparison([a, b], out_dir=tmp_path / "cmp", progress=False)
    assert not (tmp_path / "cmp").exists()


def test_methods_may_choose_their_distillation_weights_and_outer_lr():
    """The quick profile scales TGR's KD loss, not FREE's, and FREE's preset raises its outer lr: rows stay
    comparable (neither touches the meta-test protocol; each method's with-data reference is trained at
    its own lr in its own run) and the table's notes name the lrs, while a learner option that changes
    the meta-test still refuses."""
    from raydfml.compare import check_comparable, episode_way_note, outer_lr_note
    from raydfml.config import resolve
    from raydfml.errors import UserError

    free, tgr = resolve("ma", "free", "quick"), resolve("ma", "tgr", "quick")
    assert free.learner.kd_weight != tgr.learner.kd_weight and free.learner.outer_lr != tgr.learner.outer_lr
    check_comparable([free, tgr])
    assert outer_lr_note([free, tgr]) == (f"learner.outer_lr differs by method (free {free.learner.outer_lr:g}, "
                                          f"tgr {tgr.learner.outer_lr:g}): each method's meta-updates and its "
                                          "with-data reference use its own.")
    assert outer_lr_note([tgr, resolve("ma", "purer", "quick")]) is None
    # FREE's replay (and its with-data reference) runs 20-way episodes, the others 5-way: comparable, noted
    assert episode_way_note([free, tgr]) == ("meta-training episodes differ in ways by method (free 20, tgr 5-way; "
                                             "every meta-test task is 5-way): each method's replay and its "
                                             "with-data reference use its own.")
    assert episode_way_note([tgr, resolve("ma", "purer", "quick")]) is None
    tgr.learner.joint_bn = not free.learner.joint_bn
    with pytest.raises(UserError, match="learner.joint_bn"):
        check_comparable([free, tgr])


@pytest.mark.parametrize("methods,needle", [("deepinv,nope", "'nope'"), ("deepinv,", "empty name"),
                                            ("purer,purer", "purer is listed twice")])
def test_bad_method_list_gives_one_line_exit_2_and_writes_nothing(data_root, tmp_path, methods, needle):
    out = tmp_path / "cmp"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "--scenario", "mr", "--method", methods,
                           "--profile", "smoke", "--workers", "0", "--data-root", str(data_root), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --method") and needle in lines[0], proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_comparison_files_carry_per_domain_tables(tmp_path):
    """Scenario md: the headline rows are the mean over domains, each domain gets its own table."""
    from raydfml.compare import comparison_long, comparison_table, write_comparison

    def recs(acc):
        return [{"way": 5, "shot": s, "tasks": 6, "accuracy": acc + s, "ci95": 1.0} for s in (1, 5)]

    comp = {"scenario": "md", "profile": "smoke", "seed": 0, "methods": ["deepinv", "free"],
            "runs": {"deepinv": {"meta_test": recs(30), "meta_updates": 6, "wall_s": 4.0},
                     "free": {"meta_test": recs(40), "meta_updates": 3, "wall_s": 3.0}},
            "baselines": {"random_init": recs(20)}, "baseline_info": {"random_init": {"meta_updates": 0}},
            "notes": ["a note"], "wall_s": 9.0,
            "meta_test_domains": {d: {"free": recs(40 + k), "random_init": recs(20 + k), "deepinv": recs(30 + k)}
                                  for k, d in enumerate(["latin", "greek"])}}
    table = comparison_table(comp)
    assert table.index.tolist() == ["deepinv", "free", "random_init"]
    assert table.loc["free", "5-way 5-shot"] == "45.0 ± 1.0" and table.loc["random_init", "wall (s)"] == "–"
    assert table["meta-updates"].tolist() == ["6", "3", "0"]
    long = comparison_long(comp)
    assert len(long) == 3 * 2 * 3                      # rows x shots x (headline + 2 domains)
    greek = long[(long["domain"] == "greek") & (long["model"] == "deepinv") & (long["shot"] == 1)]
    assert greek["accuracy"].tolist() == [32.0]
    write_comparison(tmp_path, comp)
    md = (tmp_path / "comparison.md").read_text()
    assert "## latin" in md and "## greek" in md and md.index("## latin") < md.index("## greek")
    assert "- a note" in md and "mean over the 2 domains" in md
    assert json.loads((tmp_path / "comparison.json").read_text())["meta_test_domains"]["greek"]["free"][0]["accuracy"] == 42.0
