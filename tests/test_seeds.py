"""``launch.py --seeds 0,1``: one run (or comparison) per seed, then mean ± std across seeds."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pandas as pd
import pytest

from raydfml.cli import main
from raydfml.errors import UserError

pytestmark = pytest.mark.e2e
SHRINK = ["--set", "train.rounds=2", "--set", "train.eval_every=1", "--set", "train.val_tasks=2",
          "--set", "train.test_tasks=6", "--set", "synth.steps=2"]


def _main(argv):
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


def test_several_seeds_give_per_seed_runs_and_mean_and_std(smoke_root, tmp_path):
    out = tmp_path / "seeds"
    argv = ["--scenario", "mr", "--method", "deepinv", "--profile", "smoke", "--workers", "0", "--quiet",
            "--data-root", str(smoke_root), "--out", str(out), "--seeds", "0,1", *SHRINK]
    rc, stdout = _main(argv)
    assert rc == 0 and "mean ± std over seeds 0, 1" in stdout
    per_seed = {s: json.loads((out / f"seed{s}" / "results.json").read_text()) for s in (0, 1)}
    assert [per_seed[s]["seed"] for s in (0, 1)] == [0, 1]
    long = pd.read_csv(out / "seeds.csv")
    row = long[(long["model"] == "deepinv") & (long["shot"] == 1)].iloc[0]
    accs = [next(r["accuracy"] for r in per_seed[s]["meta_test"] if r["shot"] == 1) for s in (0, 1)]
    assert row["mean"] == pytest.approx(np.mean(accs)) and row["std"] == pytest.approx(np.std(accs, ddof=1))
    assert [row["seed0"], row["seed1"]] == pytest.approx(accs)
    assert set(long["model"]) == {"deepinv", "random_init", "teacher_average", "with_data", "with_data_pool"}
    assert "deepinv" in (out / "seeds.md").read_text() and json.loads((out / "seeds.json").read_text())["seeds"] == [0, 1]
    # finished: refused without --resume, read back with it
    with pytest.raises(UserError, match="--resume"):
        main(argv)
    rc, stdout = _main([*argv, "--resume"])
    assert rc == 0 and stdout.count("finished earlier") == 2
    assert pd.read_csv(out / "seeds.csv").equals(long)


def test_seeds_must_be_integers_each_once():
    from raydfml.seeds import parse_seeds

    assert parse_seeds("2,0,1") == [2, 0, 1]
    for bad in ("", "0,0", "a,1"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)
