"""A user's own dataset given as a folder (--dataset PATH): seeds' layout without split CSVs, grey images
of another size, N-way other than 5, and one-line errors before any work starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydfml.config import resolve
from raydfml.errors import UserError

REPO = Path(__file__).resolve().parents[2]
CLASSES = {"meta_train": 6, "meta_val": 3, "meta_test": 3}


def write_folder(root: Path, per_class: int = 24, size: int = 40) -> Path:
    """Grey images, one coarse pattern per class plus noise (learnable by a one-epoch teacher)."""
    rng = np.random.default_rng(0)
    for split, n in CLASSES.items():
        for c in range(n):
            pattern = rng.uniform(0, 255, size=(4, 4))
            base = np.kron(pattern, np.ones((size // 4, size // 4)))
            cdir = root / split / f"{split}-c{c}"
            cdir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img, mode="L").save(cdir / f"{i:02d}.png")
    return root


def test_folder_spec_sizes_and_normalises_from_the_images(tmp_path):
    from raydfml.data.registry import get_spec

    ddir = write_folder(tmp_path / "mine")
    spec = get_spec(str(ddir))
    assert spec.image_size == 40 and spec.name == str(ddir.resolve())
    assert all(0.2 < m < 0.8 for m in spec.mean) and spec.mean[0] == pytest.approx(spec.mean[1])   # grey -> 3 ch
    stats = json.loads((ddir / ".cache" / "stats.json").read_text())
    assert stats["mean"] == pytest.approx(list(spec.mean)) and stats["sample"] == 6 * 24
    assert spec.slug.startswith("mine-") and "/" not in spec.slug


def test_too_few_classes_for_the_way_is_a_one_line_error(tmp_path):
    ddir = write_folder(tmp_path / "mine", per_class=2)
    with pytest.raises(UserError, match=r"5-way tasks \(train.way\) need 5 classes but meta_val/ has 3"):
        resolve("mr", "deepinv", "smoke", {"data.dataset": str(ddir)})
    resolve("mr", "deepinv", "smoke", {"data.dataset": str(ddir), "train.way": 3, "pool.way": 3})


@pytest.mark.parametrize("breakage,needle", [("empty_class", "holds no images"), ("no_val", "meta_val/ is missing"),
                                             ("nothing", "no such folder")])
def test_broken_folders_are_one_line_errors(tmp_path, breakage, needle):
    ddir = write_folder(tmp_path / "mine", per_class=2)
    if breakage == "empty_class":
        (ddir / "meta_test" / "empty").mkdir()
    elif breakage == "no_val":
        import shutil

        shutil.rmtree(ddir / "meta_val")
    else:
        ddir = tmp_path / "absent"
    with pytest.raises(UserError, match=needle):
        resolve("mr", "deepinv", "smoke", {"data.dataset": str(ddir), "train.way": 3, "pool.way": 3})


@pytest.mark.e2e
def test_launch_on_a_users_folder_3_way_on_ray(tmp_path):
    """The folder's spec reaches the Ray actors (they find it by its absolute path)."""
    ddir = write_folder(tmp_path / "mine")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, str(REPO / "launch.py"), "--scenario", "mr", "--profile", "smoke", "--quiet",
           "--workers", "2", "--dataset", str(ddir), "--data-root", str(tmp_path / "root"),
           "--out", str(tmp_path / "run"), "--set", "train.way=3", "--set", "pool.way=3",
           "--set", "train.baselines=random_init,with_data"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {(r["way"], r["shot"]) for r in results["meta_test"]} == {(3, 1), (3, 5)}
    assert (ddir / "split" / "meta_train.csv").is_file() and "wrote split/*.csv" in proc.stderr
    model = json.loads((tmp_path / "run" / "model.json").read_text())
    assert model["way"] == 3 and model["image_size"] == 40 and str(ddir) in model["normalization"]
    bad = subprocess.run(cmd[:-6] + ["--out", str(tmp_path / "bad")], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "need 5 classes" in lines[0]
    assert not (tmp_path / "bad").exists()
