"""benchmarks/test_time_features.py on a finished smoke ProtoNet run: its `plain` rule is the engine's
meta-test (method and retrained with-data reference equal the run's own results), the other rules score
the same models on the same tasks."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "test_time_features.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("test_time_features_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def protonet_run(smoke_root, tmp_path_factory):
    from raydfml.config import resolve
    from raydfml.experiment import run_experiment

    cfg = resolve("mr", "deepinv", "smoke", {"data.data_root": str(smoke_root), "runtime.workers": 0,
                                             "learner.name": "protonet",
                                             "train.baselines": "random_init,with_data"})
    cfg.out = str(tmp_path_factory.mktemp("ttf") / "run")
    return Path(run_experiment(cfg, progress=False)["run_dir"])


def test_plain_rule_reproduces_the_runs_own_table_and_other_rules_score_the_same_models(bench, protonet_run):
    results = json.loads((protonet_run / "results.json").read_text())
    rows = bench.score(protonet_run, ("plain", "l2"))
    plain, l2 = rows
    assert [r["rule"] for r in rows] == ["plain", "l2"]
    for rec in results["meta_test"]:
        s = rec["shot"]
        assert plain[f"method@{s}"] == pytest.approx(rec["accuracy"], abs=1e-9)
        for name in ("with_data", "random_init"):
            ref = next(b for b in results["baselines"][name] if b["shot"] == s)
            assert plain[f"{name}@{s}"] == pytest.approx(ref["accuracy"], abs=1e-9), name
        want = (rec["accuracy"] - plain[f"random_init@{s}"]) / (plain[f"with_data@{s}"] - plain[f"random_init@{s}"])
        assert plain[f"recovered@{s}"] == pytest.approx(want)
        assert all(0.0 <= l2[f"{n}@{s}"] <= 100.0 for n in ("method", "with_data", "random_init"))
    assert all(math.isfinite(v) for v in l2.values() if isinstance(v, float))
    assert "| run | rule |" in bench.table(rows)


def test_a_run_of_another_learner_is_refused_in_one_line(bench, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"learner": {"name": "maml"}}))
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="these rules are ProtoNet's"):
        bench.score(tmp_path)


def test_unknown_rule_and_unfinished_run_are_refused(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path), "--rules", "cosine"])
    assert "unknown rule 'cosine'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path)])
    assert "not a finished run directory" in capsys.readouterr().err
