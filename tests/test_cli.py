"""The command line: `raydfml` / `python -m raydfml` equal launch.py, --print-config, --config, and
--tune refusing options it would ignore."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raydfml.cli import main, parse_args

REPO = Path(__file__).resolve().parents[1]


def test_print_config_shows_the_resolved_config_and_does_nothing(tmp_path, capsys):
    assert main(["--scenario", "ma", "--set", "train.rounds=5", "--data-root", str(tmp_path), "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["scenario"] == "ma" and cfg["method"] == "free" and cfg["train"]["rounds"] == 5
    assert cfg["aggregate"]["rule"] == "align" and cfg["align"]["scale"] == 3.0
    assert list(tmp_path.iterdir()) == []                      # nothing generated, nothing trained


def test_config_file_sets_launch_options_and_the_command_line_wins(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("scenario: ma\nmethod: tgr\nset:\n  train.rounds: 7\n  tgr.groups: 2\n")
    args = parse_args(["--config", str(run)])
    assert (args.scenario, args.method) == ("ma", "tgr") and "train.rounds=7" in args.set
    assert parse_args(["--config", str(run), "--method", "free"]).method == "free"
    main(["--config", str(run), "--print-config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["rounds"] == 7 and cfg["tgr"]["groups"] == 2


@pytest.mark.parametrize("text,needle", [("scenarioo: ma\n", "unknown option 'scenarioo'"),
                                         ("[1, 2]\n", "expected a mapping"), ("set: 3\n", "'set' must be a mapping")])
def test_bad_config_files_are_one_line_errors(tmp_path, text, needle):
    run = tmp_path / "run.yaml"
    run.write_text(text)
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "--config", str(run)], capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr


def test_tune_refuses_options_it_would_ignore():
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "--tune", str(REPO / "tune_configs" / "smoke.yaml"),
                           "--method", "free", "--workers", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--method, --workers would be ignored" in proc.stderr


def test_python_dash_m_raydfml_is_launch():
    out = [subprocess.run(cmd + ["--scenario", "mr", "--profile", "smoke", "--print-config"], capture_output=True,
                          text=True, timeout=120, cwd=REPO).stdout
           for cmd in ([sys.executable, "-m", "raydfml"], [sys.executable, str(REPO / "launch.py")])]
    assert out[0] == out[1] and "scenario: mr" in out[0]
