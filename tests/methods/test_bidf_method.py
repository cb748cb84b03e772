"""BiDf-MKD (``bidf``) in the engine: black-box scenarios end to end, query accounting that survives a
resume, run budgets that stop cleanly, and black-box pools that hand out nothing but answers."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from raydfml.errors import RunStopped, UserError

pytestmark = pytest.mark.e2e


def bidf_cfg(root, scenario="ss", workers=0, **over):
    from raydfml.config import resolve

    return resolve(scenario, None, "smoke", {"data.data_root": str(root), "runtime.workers": workers,
                                              "runtime.device": "cpu", **over})


def visit_images(cfg) -> int:
    """Images one API visit costs: two recoveries (steps * N * (1 + q) + N each) and two answer queries."""
    n = cfg.pool.way * cfg.synth.per_class
    return 2 * (cfg.synth.steps * n * (1 + cfg.section("bidf").q) + n) + 2 * n


def expected_per_api(cfg, entries, rounds: int) -> dict[str, int]:
    """Images per API after ``rounds`` rounds, from the driver's seeded draw of each round's teachers."""
    from raydfml.runtime.pool import round_teachers

    out: dict[str, int] = {}
    for r in range(rounds):
        for t in round_teachers(len(entries), cfg.train.teachers_per_round, cfg.seed, r):
            out[str(t)] = out.get(str(t), 0) + visit_images(cfg)
    return out


def run(cfg, out, resume=False):
    from raydfml.experiment import run_experiment

    cfg.out = str(out)
    return run_experiment(cfg, resume=resume, progress=False)


def check_queries(results: dict, cfg, out) -> None:
    """results.json, metrics.csv and the checkpoint agree on the query totals, and they are what the
    visits cost."""
    q = json.loads((out / "results.json").read_text())["queries"]
    assert q == results["queries"]
    rounds, per_round = cfg.train.rounds, cfg.train.teachers_per_round
    assert q["total"]["images"] == rounds * per_round * visit_images(cfg)
    assert q["total"]["images"] == sum(a["images"] for a in q["apis"].values())
    assert q["total"]["calls"] == sum(a["calls"] for a in q["apis"].values()) > 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["queries/round_images"].tolist() == [per_round * visit_images(cfg)] * rounds
    assert metrics["queries/images"].iloc[-1] == q["total"]["images"]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["meta"]
    assert state["method"]["queries"]["images"] == q["total"]["images"]
    assert state["method"]["queries"]["apis"] == q["apis"]


def test_bidf_is_the_default_of_the_black_box_scenarios_and_runs_in_ss(smoke_root, tmp_path):
    cfg = bidf_cfg(smoke_root)
    assert cfg.method == "bidf" and cfg.pool.black_box and cfg.learner.train_shot == 1
    results = run(cfg, tmp_path / "run")
    check_queries(results, cfg, tmp_path / "run")
    assert set(results["baselines"]) == {"random_init", "with_data", "with_data_pool"}   # no weight averaging
    assert {a["arch"] for a in results["queries"]["apis"].values()} == {"conv4"}
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["bank/images"].iloc[-1] > 0 and metrics["kd/grad_norm"].gt(0).all()


def test_bidf_on_ray_counts_the_same_queries(smoke_root, tmp_path, ray_session):
    cfg = bidf_cfg(smoke_root, workers=2)
    results = run(cfg, tmp_path / "run")
    check_queries(results, cfg, tmp_path / "run")
    assert results["actors_replaced"] == 0


def test_resume_restores_the_query_totals_exactly(smoke_root, tmp_path):
    """A run interrupted after round 1 keeps its totals in the checkpoint, and the resumed run ends
    with exactly the per-API counts an uninterrupted run has."""
    from raydfml.report import RunReport
    from raydfml.runtime.driver import train
    from raydfml.runtime.pool import prepare_pool

    cfg = bidf_cfg(smoke_root, **{"train.rounds": 3})
    entries = prepare_pool(cfg, workers=0, progress=False)
    out = tmp_path / "run"

    def go(resume=False, crash_after=None):
        def hook(r, metrics, ex):
            if crash_after is not None and r == crash_after:
                raise KeyboardInterrupt
        report = RunReport(out, cfg.to_dict(), resume=resume)
        try:
            return train(cfg, out, report, resume=resume, progress=False, entries=entries, on_round_end=hook)
        finally:
            report.close()

    with pytest.raises(KeyboardInterrupt):
        go(crash_after=1)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["meta"]
    two = expected_per_api(cfg, entries, 2)
    assert {k: v["images"] for k, v in state["method"]["queries"]["apis"].items()} == two
    trained = go(resume=True)
    q = trained["method_report"]["queries"]
    assert {k: v["images"] for k, v in q["apis"].items()} == expected_per_api(cfg, entries, 3)
    assert q["total"]["images"] == 3 * cfg.train.teachers_per_round * visit_images(cfg)


def test_a_run_budget_stops_cleanly_and_a_larger_one_resumes(smoke_root, tmp_path, capsys):
    per_round = bidf_cfg(smoke_root).train.teachers_per_round * visit_images(bidf_cfg(smoke_root))
    cfg = bidf_cfg(smoke_root, **{"bidf.max_images": int(2.5 * per_round)})
    with pytest.raises(RunStopped) as stop:
        run(cfg, tmp_path / "run")
    message = str(stop.value)
    assert "\n" not in message and "bidf.max_images" in message and "round 2" in message
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["round"] == 1 and ck["meta"]["method"]["queries"]["images"] == 2 * per_round
    assert not (tmp_path / "run" / "results.json").exists()
    bigger = bidf_cfg(smoke_root, **{"bidf.max_images": 10 * per_round})
    results = run(bigger, tmp_path / "run", resume=True)
    check_queries(results, bigger, tmp_path / "run")


def test_a_budget_smaller_than_one_visit_stops_before_round_0_and_resumes(smoke_root, tmp_path):
    """The checkpoint written before any round (round -1) is usable: --resume starts at round 0."""
    cfg = bidf_cfg(smoke_root, **{"train.rounds": 1, "bidf.max_images_per_api": 10})
    with pytest.raises(RunStopped, match="max_images_per_api=10"):
        run(cfg, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["round"] == -1
    unlimited = bidf_cfg(smoke_root, **{"train.rounds": 1})
    results = run(unlimited, tmp_path / "run", resume=True)
    check_queries(results, unlimited, tmp_path / "run")


def test_a_per_api_budget_stops_before_the_visit_that_would_exceed_it(smoke_root):
    from raydfml.methods import create_method

    cfg = bidf_cfg(smoke_root, **{"bidf.max_images_per_api": visit_images(bidf_cfg(smoke_root)) + 1})
    method = create_method(cfg)
    totals = {"apis": {"3": {"calls": 1, "images": 2}}, "calls": 1, "images": 2}
    method.check_budget(0, [0, 1], totals, {0: 5, 1: 5})            # fresh APIs fit
    with pytest.raises(RunStopped, match="'teacher 3'.*max_images_per_api"):
        method.check_budget(0, [0, 3], totals, {0: 5, 3: 5})


@pytest.fixture
def black_box_pool(smoke_root):
    from raydfml.runtime.pool import prepare_pool
    from raydfml.runtime.teacher_pool import TeacherPool

    cfg = bidf_cfg(smoke_root)
    entries = prepare_pool(cfg, workers=0, progress=False)
    return cfg, entries, TeacherPool(cfg.to_dict(), entries, device="cpu")


def _walk(obj):
    """Every value inside a record (dataclass fields, dicts, lists)."""
    import dataclasses

    yield obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(k)
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)


def test_nothing_but_numbers_crosses_from_a_black_box_pool(black_box_pool):
    """The records of an API visit hold numpy arrays and plain values only: no tensor (so no weights,
    buffers or autograd history), no module, no API object; their pickle never mentions torch."""
    from raydfml.blackbox import BlackBoxAPI

    cfg, entries, pool = black_box_pool
    theta = np.concatenate([p.detach().flatten().numpy() for p in pool.meta_model.parameters()])
    summaries, records = pool.work("visit", 0, [0, 1], {0: None, 1: None}, theta,
                                   {"budget": "run", "calls": 0, "images": 0})
    for value in _walk(records):
        assert not isinstance(value, (torch.Tensor, torch.nn.Module, BlackBoxAPI)), type(value)
    assert b"torch" not in pickle.dumps(records)
    rec = records[0]
    assert rec.images.dtype == np.float16 and rec.grad.dtype == np.float32 and rec.grad.shape == theta.shape
    assert len(rec.images) == 2 * cfg.pool.way * cfg.synth.per_class             # support + query set
    assert rec.queries == {"0": {"arch": "conv4", "calls": rec.queries["0"]["calls"], "images": visit_images(cfg)}}
    assert all(s.images is None and s.grad is None and s.queries == r.queries for s, r in zip(summaries, records))


def test_a_black_box_pool_refuses_white_box_access(black_box_pool):
    cfg, entries, pool = black_box_pool
    for attempt in (lambda: pool.teacher(0), lambda: pool.synthesize(0, seed=1),
                    lambda: pool.predict(0, np.zeros((1, 3, 16, 16), np.float32))):
        with pytest.raises(UserError, match="black-box") as err:
            attempt()
        assert "\n" not in str(err.value)
    assert pool.api(0).predict(torch.rand(2, 3, pool.image_size, pool.image_size)).shape == (2, cfg.pool.way)


def test_white_box_methods_refuse_black_box_teachers(smoke_root):
    """In a black-box scenario a white-box method is refused at configuration time (one line); forced
    onto a black-box pool anyway, its synthesizer is refused by the pool."""
    from raydfml.config import compatible, resolve
    from raydfml.runtime.pool import prepare_pool
    from raydfml.runtime.teacher_pool import TeacherPool

    for method in ("deepinv", "free", "tgr", "purer"):
        with pytest.raises(UserError, match="black-box") as err:
            resolve("ss", method, "smoke")
        assert "\n" not in str(err.value)
        assert not compatible("sh", method) and compatible("ma", method)
    with pytest.raises(UserError, match="teacher_average"):
        resolve("ss", None, "smoke", {"train.baselines": "random_init,teacher_average"})
    cfg = resolve("mr", "deepinv", "smoke", {"data.data_root": str(smoke_root), "runtime.device": "cpu"})
    cfg.pool.black_box = True                                            # past validation, on purpose
    pool = TeacherPool(cfg.to_dict(), prepare_pool(cfg, workers=0, progress=False), device="cpu")
    with pytest.raises(UserError, match="synthesizer 'pixel' needs a white-box teacher"):
        pool.work("recover", 0, [0], None, None, None)


@pytest.mark.parametrize("scenario", ["sh", "mh"])
def test_sh_and_mh_run_on_the_smoke_profile(scenario, smoke_root, tmp_path):
    cfg = bidf_cfg(smoke_root, scenario)
    results = run(cfg, tmp_path / "run")
    check_queries(results, cfg, tmp_path / "run")
    assert cfg.pool.archs == ("conv4", "resnet10", "resnet18")
    if scenario == "mh":
        assert len(cfg.data.domains) == 2 and set(results["meta_test_domains"]) == set(cfg.data.domains)


def test_a_bidf_round_from_two_actors_equals_in_process(ma_pool, ray_session, tmp_path):
    """Round 1 (boundary term on) on one conv4, one resnet10 and one resnet18 API: the same meta-update
    and the same query totals whether two Ray actors or one process visit the APIs."""
    from method_rounds import assert_same_update, executors, last_grad, method_cfg, one_round

    root, entries = ma_pool
    cfg = method_cfg(root, "bidf", 2)
    ray_ex, local = executors(cfg, method_cfg(root, "bidf", 0), entries)
    try:
        m_ray, _ = one_round(cfg, ray_ex, entries, 1, tmp_path / "ray")
        m_local, batch = one_round(method_cfg(root, "bidf", 0), local, entries, 1, tmp_path / "local")
        assert np.linalg.norm(last_grad(local)) > 0
        assert_same_update(last_grad(ray_ex), last_grad(local))
        assert {r.arch for r in batch.summaries} == {"conv4", "resnet10", "resnet18"}
        totals = ray_ex.get(ray_ex.call(ray_ex.meta, "central", "query_totals", 1))
        assert totals == local.meta.central("query_totals", 1)
        assert totals["images"] == 3 * visit_images(cfg) == m_ray["queries/images"] == m_local["queries/images"]
    finally:
        ray_ex.shutdown()


@pytest.mark.parametrize("via", ["learner", "head"])
def test_a_protonet_visit_distils_through_the_learner_it_is_told_to(smoke_root, via):
    """ProtoNet has no inner loop and never uses its linear head: with learner.distill_via=learner the
    visit's KD goes through the support set's prototypes (the head gets no gradient); with head, through
    the head after the KD steps (as the original's MAML)."""
    from raydfml.runtime.pool import prepare_pool
    from raydfml.runtime.teacher_pool import TeacherPool

    cfg = bidf_cfg(smoke_root, **{"learner.name": "protonet", "learner.distill_via": via})
    entries = prepare_pool(cfg, workers=0, progress=False)
    pool = TeacherPool(cfg.to_dict(), entries, device="cpu")
    theta = np.concatenate([p.detach().flatten().numpy() for p in pool.meta_model.parameters()])
    _, records = pool.work("visit", 0, [0], {0: None}, theta, {"budget": "run", "calls": 0, "images": 0})
    grad, offset, per_name = records[0].grad, 0, {}
    for name, p in pool.meta_model.named_parameters():
        per_name[name] = float(np.abs(grad[offset:offset + p.numel()]).sum())
        offset += p.numel()
    head = [n for n in per_name if n.startswith("classifier")]
    assert head and all(np.isfinite(v) for v in per_name.values())
    body = sum(v for n, v in per_name.items() if n not in head)
    assert body > 0
    if via == "learner":
        assert all(per_name[n] == 0 for n in head), {n: per_name[n] for n in head}
    else:
        assert sum(per_name[n] for n in head) > 0
