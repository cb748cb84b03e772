#!/usr/bin/env python
"""raydfml's command line: one data-free meta-learning experiment end to end.

    python launch.py --scenario mr                      # quick profile on the embedded glyphs
    python launch.py --scenario mr --profile smoke      # seconds, for tests
    python launch.py --scenario mr --resume --out runs/x

With nothing on disk it generates the glyph dataset and the teacher zoo first, then trains and
writes a run directory (config, metrics.csv, TensorBoard events, checkpoints, results.json/.md).
"""
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # works before `pip install -e .` too

from raydfml.cli import cli  # noqa: E402

if __name__ == "__main__":
    cli()
