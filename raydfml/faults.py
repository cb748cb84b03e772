"""Fault injection for tests: ``RAYDFML_FAULT=<point>@<round>`` kills this process (SIGKILL, no cleanup,
as a node failure or the OOM killer would) when the run reaches ``point`` in round ``round``.

Points: ``after_synthesis`` (the round's teacher work is done, nothing central yet), ``after_meta_step``
(replay's meta-updates are done, the round is not checkpointed), ``mid_checkpoint`` (the new checkpoint
is written but not yet renamed into place), ``mid_meta_test`` (training is over and the model written;
the run dies as its final meta-test begins; ``@<round>`` is ignored). Unset in normal use: then every call is a dictionary lookup.
"""
from __future__ import annotations

import os
import signal

FAULT_ENV = "RAYDFML_FAULT"
POINTS = ("after_synthesis", "after_meta_step", "mid_checkpoint", "mid_meta_test")


def maybe_fail(point: str, round_idx: int | None = None) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name != point:
        return
    if round_idx is not None and at and int(at) != int(round_idx):
        return
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["FAULT_ENV", "POINTS", "maybe_fail"]
