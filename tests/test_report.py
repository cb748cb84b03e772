"""Run directory: config, metrics CSV (growing columns, resume truncation), TensorBoard, results files."""
from __future__ import annotations

import json
import struct
import sys

import pandas as pd
import pytest
import torch

from raydfml.evaluation import EvalResult
from raydfml.report import RunReport, format_markdown, results_long, results_table

CONFIG = {"scenario": "glyphs-conv4", "method": "free", "profile": "smoke", "seed": 0,
          "synthesis": {"steps": 3, "lr": 0.1}, "device": torch.device("cpu")}


def tb_events(run_dir):
    """(tag, step, value) of every scalar in the run's event files (minimal TFRecord reader)."""
    from tensorboardX.proto import event_pb2

    out = []
    for f in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.append((v.tag, ev.step, v.simple_value if v.WhichOneof("value") == "simple_value" else None))
    return out


def results_dict(**extra):
    rec = lambda acc, ci, shot: {"way": 5, "shot": shot, "tasks": 600, "accuracy": acc, "ci95": ci}  # noqa: E731
    return {"scenario": "glyphs-conv4", "method": "free", "profile": "smoke", "seed": 0, "wall_s": 12.5,
            "meta_test": [rec(48.42, 1.08, 1), EvalResult(5, 5, 600, 63.04, 0.91, [1.0])],
            "baselines": {"random_init": [rec(20.1, 0.5, 1), rec(20.3, 0.4, 5)],
                          "teacher_average": None,
                          "with_data": [rec(55.0, 1.0, 1), rec(70.0, 0.8, 5)]},
            **extra}


def test_config_metrics_and_tensorboard(tmp_path):
    run = tmp_path / "run"
    rep = RunReport(run, CONFIG)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["synthesis"] == {"lr": 0.1, "steps": 3} and cfg["device"] == "cpu"
    assert list(cfg) == sorted(cfg)
    assert (run / "config.yaml").exists()
    rep.log_round(0, {"loss/kd": 1.5, "time/synthesis_s": torch.tensor(0.25)})
    rep.log_round(1, {"loss/kd": 1.25, "time/synthesis_s": 0.5})
    rep.log_round(1, {"val/acc": 40.0})              # same round: merged into its row
    rep.log_round(2, {"loss/kd": 1.0, "val/acc": 45.0, "note": "x"})
    df = pd.read_csv(run / "metrics.csv")
    assert list(df.columns) == ["round", "loss/kd", "time/synthesis_s", "val/acc", "note"]
    assert df["round"].tolist() == [0, 1, 2]
    assert df["loss/kd"].tolist() == [1.5, 1.25, 1.0]
    assert pd.isna(df["val/acc"][0]) and df["val/acc"][2] == 45.0
    with pytest.raises(ValueError):
        rep.log_round(3, {"round": 3})
    rep.log_images(2, "synth/teacher0", torch.rand(12, 3, 8, 8), nrow=4, save_png=True)
    assert (run / "images" / "synth_teacher0_r2.png").exists()
    rep.close()
    events = tb_events(run)
    scalars = {(t, s): v for t, s, v in events if v is not None}
    assert scalars[("loss/kd", 1)] == 1.25 and scalars[("time/synthesis_s", 0)] == 0.25
    assert scalars[("val/acc", 2)] == 45.0
    tags = {t for t, _, _ in events}
    assert "synth/teacher0" in tags and any(t.startswith("config") for t in tags)
    assert not (run / "results.json").exists()


def test_finish_writes_all_results(tmp_path):
    run = tmp_path / "run"
    rep = RunReport(run, CONFIG)
    for r in range(4):
        rep.log_round(r, {"loss/kd": 1.0 / (r + 1), "val/acc": 30.0 + r, "val/ci95": 1.0})
    rep.finish(results_dict(extra_field={"k": 1}))
    res = json.loads((run / "results.json").read_text())
    for key in ("scenario", "method", "profile", "seed", "wall_s", "meta_test", "baselines"):
        assert key in res
    assert res["meta_test"][1] == {"way": 5, "shot": 5, "tasks": 600, "accuracy": 63.04, "ci95": 0.91}
    assert set(res["baselines"]) == {"random_init", "teacher_average", "with_data"}
    assert res["extra_field"] == {"k": 1}
    md = (run / "results.md").read_text()
    assert "48.4 ± 1.1" in md and "63.0 ± 0.9" in md and "5-way 1-shot" in md and "teacher_average" in md
    csv = pd.read_csv(run / "results.csv")
    assert list(csv.columns) == ["model", "domain", "way", "shot", "tasks", "accuracy", "ci95"]
    assert csv["domain"].isna().all()           # one dataset: headline records only
    assert set(csv["model"]) == {"free", "random_init", "with_data"}
    png = (run / "meta_val.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".*tmp*"))
    assert rep.writer is None


def test_results_table_shape_and_values():
    df = results_table(results_dict())
    assert list(df.index) == ["free", "random_init", "teacher_average", "with_data"]
    assert list(df.columns) == ["5-way 1-shot", "5-way 5-shot"]
    assert df.loc["free", "5-way 1-shot"] == "48.4 ± 1.1"
    assert df.loc["teacher_average", "5-way 5-shot"] == "n/a"
    long = results_long(results_dict())
    assert len(long) == 6 and long["accuracy"].dtype.kind == "f"


def test_markdown_without_tabulate(monkeypatch):
    monkeypatch.setitem(sys.modules, "tabulate", None)   # import tabulate -> ImportError
    md = format_markdown(results_table(results_dict()))
    lines = md.splitlines()
    assert len(lines) == 2 + 4
    assert lines[0].startswith("| model") and "5-way 1-shot" in lines[0]
    assert set(lines[1]) <= set("|-:")
    assert all(ln.count("|") == lines[0].count("|") for ln in lines)
    assert "| free" in lines[2] and "48.4 ± 1.1" in lines[2]


def test_finish_rejects_incomplete_results_and_skips_missing_plot(tmp_path):
    run = tmp_path / "run"
    rep = RunReport(run, CONFIG)
    rep.log_round(0, {"loss/kd": 1.0})
    bad = results_dict()
    del bad["wall_s"]
    with pytest.raises(ValueError, match="wall_s"):
        rep.finish(bad)
    assert not (run / "results.json").exists()
    rep.finish(results_dict())
    assert (run / "results.json").exists() and not (run / "meta_val.png").exists()


def test_resume_truncates_and_fresh_run_resets(tmp_path):
    run = tmp_path / "run"
    rep = RunReport(run, CONFIG)
    for r in range(5):
        rep.log_round(r, {"loss/kd": float(r)})
    rep.finish(results_dict())
    # Resume after round 2: later rows dropped, re-logged rounds are not duplicated.
    rep = RunReport(run, CONFIG, resume=True)
    assert not (run / "results.json").exists()          # not complete until finish()
    assert rep.last_round == 4
    rep.truncate(2)
    assert pd.read_csv(run / "metrics.csv")["round"].tolist() == [0, 1, 2]
    for r in (3, 4):
        rep.log_round(r, {"loss/kd": 10.0 + r, "val/acc": 50.0})
    rep.close()
    df = pd.read_csv(run / "metrics.csv")
    assert df["round"].tolist() == [0, 1, 2, 3, 4]
    assert df["loss/kd"].tolist() == [0.0, 1.0, 2.0, 13.0, 14.0]
    # A fresh (non-resume) run in the same directory starts a new metrics file.
    rep = RunReport(run, CONFIG)
    rep.log_round(0, {"x": 1.0})
    rep.close()
    assert list(pd.read_csv(run / "metrics.csv").columns) == ["round", "x"]
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
