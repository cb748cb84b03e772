"""A user's error raised inside a Ray actor reaches the terminal as the one line it was."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raydfml.errors import UserError, user_error_of

REPO = Path(__file__).resolve().parents[1]


def test_user_errors_from_an_actor_method_and_constructor_are_one_line(ray_session):
    ray = ray_session

    class Probe:                         # defined here: pickled by value (the test module is not on the workers)
        def __init__(self, fail: bool = False):
            if fail:
                raise UserError("config x.y=3: must be at most 2")

        def read(self):
            raise UserError("data/img.png: corrupt or unreadable image")

    actor = ray.remote(Probe)
    with pytest.raises(Exception) as method_err:
        ray.get(actor.remote().read.remote())
    assert len(str(method_err.value).splitlines()) > 1           # what the user saw before: the remote traceback
    assert str(user_error_of(method_err.value)) == "data/img.png: corrupt or unreadable image"
    with pytest.raises(Exception) as init_err:
        ray.get(actor.remote(fail=True).read.remote())
    assert not isinstance(init_err.value, UserError)
    assert str(user_error_of(init_err.value)) == "config x.y=3: must be at most 2"
    assert user_error_of(ValueError("a bug")) is None            # programming errors keep their traceback


@pytest.mark.e2e
def test_a_missing_meta_val_split_on_ray_is_one_line_and_exit_2(smoke_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    (root / "glyphs-smoke" / "split" / "meta_val.csv").unlink()
    shutil.rmtree(root / "glyphs-smoke" / ".cache", ignore_errors=True)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "--scenario", "mr", "--profile", "smoke",
                           "--data-root", str(root), "--out", str(tmp_path / "run"), "--quiet", "--workers", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "meta_val.csv" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_corrupt_meta_test_image_fails_before_any_training(smoke_root, tmp_path):
    """Tried as a user would: the meta-test split was first read after all training."""
    from raydfml.config import resolve
    from raydfml.experiment import run_experiment

    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    shutil.rmtree(root / "glyphs-smoke" / ".cache", ignore_errors=True)
    victim = sorted((root / "glyphs-smoke" / "meta_test").rglob("*.png"))[3]
    victim.write_bytes(b"not a png")
    cfg = resolve("mr", "deepinv", "smoke", {"data.data_root": str(root), "runtime.workers": 0})
    cfg.out = str(tmp_path / "run")
    with pytest.raises(UserError, match=f"{victim.name}: corrupt or unreadable"):
        run_experiment(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
