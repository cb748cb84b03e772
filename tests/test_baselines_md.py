"""Scenario md's meta-test: every model on each domain's meta_test split, reported per domain and as the mean."""
from __future__ import annotations

import json
import math
from itertools import islice

import pandas as pd
import pytest
import torch

from raydfml.baselines import (evaluate_final, mean_over_domains, random_init_params, train_with_data,
                               with_data_episodes)
from raydfml.config import resolve
from raydfml.data.layout import ensure_dataset
from raydfml.report import RunReport, domain_tables

DOMAINS = ("glyphs-smoke-latin", "glyphs-smoke-greek")


@pytest.fixture(scope="module")
def md_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("md-data")
    for d in DOMAINS:
        ensure_dataset(root, d)
    return root


def _cfg(root, scenario="md", **overrides):
    return resolve(scenario, "free", "smoke", {"data.data_root": str(root), "runtime.workers": 0,
                                               "train.baselines": "random_init", **overrides})


@pytest.fixture(scope="module")
def md_results(md_root):
    cfg = _cfg(md_root)
    trained = {"best_params": random_init_params(cfg), "meta_updates": 0}
    return cfg, evaluate_final(cfg, trained, [], progress=False)


def test_every_model_is_scored_on_every_domain(md_results):
    cfg, res = md_results
    per_domain = res["meta_test_domains"]
    assert list(per_domain) == list(DOMAINS)
    for domain in DOMAINS:
        assert set(per_domain[domain]) == {cfg.method, "random_init"}
        for recs in per_domain[domain].values():
            assert [(r["way"], r["shot"], r["tasks"]) for r in recs] == [(5, 1, 10), (5, 5, 10)]
        # the method here IS the random init: same tasks per domain give the same records
        assert per_domain[domain][cfg.method] == per_domain[domain]["random_init"]
    assert per_domain[DOMAINS[0]]["random_init"] != per_domain[DOMAINS[1]]["random_init"]


def test_headline_records_are_the_mean_over_domains(md_results):
    cfg, res = md_results
    assert set(res["baselines"]) == {"random_init"}
    for model, recs in [(cfg.method, res["meta_test"]), ("random_init", res["baselines"]["random_init"])]:
        for i, rec in enumerate(recs):
            doms = [res["meta_test_domains"][d][model][i] for d in DOMAINS]
            assert rec["tasks"] == 10 and rec["shot"] == doms[0]["shot"]
            assert rec["accuracy"] == pytest.approx((doms[0]["accuracy"] + doms[1]["accuracy"]) / 2)
            assert rec["ci95"] == pytest.approx(math.hypot(doms[0]["ci95"], doms[1]["ci95"]) / 2)


def test_a_domain_cell_is_the_single_dataset_meta_test(md_root, md_results):
    """Domain d's records are exactly what a one-dataset run on d reports (same tasks, same model)."""
    cfg, res = md_results
    one = _cfg(md_root, "mr", **{"data.dataset": DOMAINS[1], "learner.adaptive_pool": True})
    alone = evaluate_final(one, {"best_params": random_init_params(one), "meta_updates": 0}, [], progress=False)
    assert "meta_test_domains" not in alone
    assert alone["meta_test"] == res["meta_test_domains"][DOMAINS[1]][cfg.method]


def test_mean_over_domains_rejects_mixed_settings():
    a = {"way": 5, "shot": 1, "tasks": 10, "accuracy": 30.0, "ci95": 3.0}
    assert mean_over_domains([a, dict(a, accuracy=50.0, ci95=4.0)]) == dict(a, accuracy=40.0, ci95=2.5)
    with pytest.raises(ValueError):
        mean_over_domains([a, dict(a, shot=5)])


def test_with_data_baseline_draws_episodes_round_robin_over_domains(md_root):
    cfg = _cfg(md_root)
    eps = list(islice(with_data_episodes(cfg), 6))
    assert [d for d, _, _ in eps] == list(DOMAINS) * 3
    assert all(spec.name == d for d, spec, _ in eps)
    # domain 0's stream is the one-dataset stream
    one = _cfg(md_root, "mr", **{"data.dataset": DOMAINS[0], "learner.adaptive_pool": True})
    alone = list(islice(with_data_episodes(one), 3))
    for (_, _, a), (_, _, b) in zip(eps[0::2], alone):
        assert torch.equal(a.support, b.support) and torch.equal(a.query_labels, b.query_labels)
    start = random_init_params(cfg)
    trained = train_with_data(cfg, 2, torch.device("cpu"))
    assert set(trained) == set(start) and any(not torch.equal(trained[n], start[n]) for n in start)


def test_results_md_has_a_table_per_domain(md_results, tmp_path):
    cfg, res = md_results
    results = {"scenario": "md", "method": cfg.method, "profile": "smoke", "seed": 0, "wall_s": 1.0, **res}
    tables = domain_tables(results)
    assert list(tables) == list(DOMAINS) and list(tables[DOMAINS[0]].index) == [cfg.method, "random_init"]
    rep = RunReport(tmp_path / "run", cfg.to_dict())
    rep.finish(results)
    md = (tmp_path / "run" / "results.md").read_text()
    assert all(f"## {d}" in md for d in DOMAINS) and "mean over the 2 domains" in md
    rec = res["meta_test_domains"][DOMAINS[1]]["random_init"][0]
    assert f"{rec['accuracy']:.1f} ± {rec['ci95']:.1f}" in md
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["meta_test_domains"] == res["meta_test_domains"]

    csv = pd.read_csv(tmp_path / "run" / "results.csv", keep_default_na=False)
    assert list(csv["domain"].unique()) == ["", *DOMAINS]          # the mean first, then each domain
    row = csv[(csv["domain"] == DOMAINS[1]) & (csv["model"] == "random_init") & (csv["shot"] == rec["shot"])]
    assert len(row) == 1 and row["accuracy"].item() == pytest.approx(rec["accuracy"])


def test_with_data_pool_draws_only_the_pools_classes_and_leaves_out_uncovered_domains(md_root):
    """with_data_pool's episodes use only the classes the pool covers, per domain; a domain whose pool
    covers fewer than train.way classes is left out of the round robin."""
    cfg = _cfg(md_root)
    covered = {DOMAINS[0]: [0, 2, 3, 5, 6, 7], DOMAINS[1]: [1, 2]}
    eps = list(islice(with_data_episodes(cfg, covered), 8))
    assert {d for d, _, _ in eps} == {DOMAINS[0]}
    assert {int(c) for _, _, ep in eps for c in ep.classes} <= set(covered[DOMAINS[0]])
    assert len({int(c) for _, _, ep in eps for c in ep.classes}) > cfg.train.way     # not one fixed task
