"""Runs never destroy each other or themselves: a fresh run refuses a used directory (finished,
unfinished, or not ours) without touching it, --resume refuses other options, one process writes a run
directory at a time, a finished run is not redone on --resume, and default names tell experiments apart."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydfml.config import resolve
from raydfml.errors import UserError
from raydfml.rundir import RunLock, check_run_dir, default_run_dir


class Interrupt(Exception):
    pass


def _cfg(root, out, **over):
    cfg = resolve("mr", "deepinv", "smoke", {"data.data_root": str(root), "runtime.workers": 0,
                                             "train.baselines": "random_init", **over})
    cfg.out = str(out)
    return cfg


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def unfinished(smoke_root, tmp_path_factory):
    """A run stopped after its second round (checkpoint, metrics and TensorBoard events on disk)."""
    from raydfml.experiment import prepare_experiment, run_method

    out = tmp_path_factory.mktemp("rundir") / "run"
    cfg = _cfg(smoke_root, out)

    def stop(r, metrics, executor):
        if r == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_method(cfg, out, prepare_experiment(cfg, progress=False), progress=False, reporter=stop)
    return out


def test_a_fresh_run_refuses_an_unfinished_run_and_leaves_it_intact(unfinished, smoke_root):
    from raydfml.experiment import run_experiment

    before = _snapshot(unfinished)
    assert "metrics.csv" in before and "checkpoints/last.pt" in before
    with pytest.raises(UserError, match="unfinished run is there; add --resume"):
        run_experiment(_cfg(smoke_root, unfinished), progress=False)
    assert _snapshot(unfinished) == before


def test_resume_with_other_options_is_refused_but_runtime_options_may_change(unfinished, smoke_root):
    with pytest.raises(UserError, match=r"learner.outer_lr=0.001 there, 0.01 now"):
        check_run_dir(unfinished, _cfg(smoke_root, unfinished, **{"learner.outer_lr": 0.01}), resume=True)
    check_run_dir(unfinished, _cfg(smoke_root, unfinished, **{"runtime.workers": 2}), resume=True)


def test_an_unrelated_folder_is_never_used(tmp_path, smoke_root):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metrics.csv").write_text("my own file\n")
    with pytest.raises(UserError, match="not a run directory"):
        check_run_dir(tmp_path / "mine", _cfg(smoke_root, tmp_path / "mine"), resume=False)
    assert (tmp_path / "mine" / "metrics.csv").read_text() == "my own file\n"


def test_one_process_writes_a_run_directory_at_a_time(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(UserError, match="another process .* is writing it"):
            with RunLock(tmp_path / "run"):
                pass
    with RunLock(tmp_path / "run"):          # released: usable again
        pass


def test_resume_of_a_finished_run_reads_it_back_and_deletes_nothing(unfinished, smoke_root, tmp_path):
    import shutil

    from raydfml.experiment import run_experiment

    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    first = run_experiment(_cfg(smoke_root, run), resume=True, progress=False)
    before = _snapshot(run)
    again = run_experiment(_cfg(smoke_root, run), resume=True, progress=False)
    assert again["meta_test"] == first["meta_test"] and _snapshot(run) == before


def test_default_names_tell_experiments_apart(smoke_root, tmp_path):
    a = _cfg(smoke_root, None)
    assert default_run_dir(a) == default_run_dir(_cfg(smoke_root, None, **{"runtime.workers": 2}))
    assert default_run_dir(a) != default_run_dir(_cfg(smoke_root, None, **{"learner.outer_lr": 0.01}))
    assert default_run_dir(a) != default_run_dir(_cfg(tmp_path, None))            # another --data-root
    assert default_run_dir(a).name.startswith("mr-deepinv-smoke-s0-")


def test_a_torn_last_checkpoint_falls_back_to_the_previous_one(unfinished, smoke_root, tmp_path, capsys):
    import shutil

    from raydfml.experiment import run_experiment
    from raydfml.runtime.driver import load_checkpoint

    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    last = run / "checkpoints" / "last.pt"
    assert load_checkpoint(run)["round"] == 1 and (run / "checkpoints" / "previous.pt").is_file()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])            # a torn write
    (run / "checkpoints" / ".last.pt.tmp-99999").write_bytes(b"left by a killed writer")
    assert load_checkpoint(run)["round"] == 0
    assert "resuming from" in capsys.readouterr().err
    results = run_experiment(_cfg(smoke_root, run), resume=True, progress=False)
    assert results["meta_updates"] > 0 and load_checkpoint(run)["round"] == _cfg(smoke_root, run).train.rounds - 1
    assert not list((run / "checkpoints").glob(".last.pt.tmp-*"))
    assert not list(run.glob(".results.*.staged")) and (run / "results.md").is_file()


def test_a_run_written_before_the_metric_option_resumes_under_its_old_name(unfinished, smoke_root, tmp_path):
    """learner.metric / metric_scale came later: a config.json without them still resumes (and the
    default directory name, a hash of the options, is the one such a run was given), while another
    metric is refused."""
    import shutil

    from raydfml.rundir import config_hash

    old = tmp_path / "old"
    shutil.copytree(unfinished, old)
    stored = json.loads((old / "config.json").read_text())
    del stored["learner"]["metric"], stored["learner"]["metric_scale"]
    (old / "config.json").write_text(json.dumps(stored))
    check_run_dir(old, _cfg(smoke_root, old), resume=True)
    cosine = _cfg(smoke_root, old, **{"learner.name": "protonet", "learner.metric": "cosine"})
    with pytest.raises(UserError, match=r"learner.metric=None there, 'cosine' now"):
        check_run_dir(old, cosine, resume=True)
    assert config_hash(_cfg(smoke_root, old)) != config_hash(cosine)
    # the hash leaves the later options out at their defaults, so it is that of a config without them
    from raydfml.rundir import _comparable

    kept = _comparable(_cfg(smoke_root, old).to_dict())
    assert "learner.metric" not in kept and "learner.metric_scale" not in kept
