"""Run directories that runs never destroy: naming, the checks before a run starts, and a lock.

- The default name carries a short hash of everything that decides the results (every option except
  where and how it runs: ``runtime.*``), the data root included, so two different experiments never
  share a directory: ``runs/<scenario>-<method>-<profile>-s<seed>-<hash>``.
- A fresh run refuses a directory that holds a finished run, an unfinished one (``--resume`` continues
  it) or anything else (an unrelated folder is never cleaned up as if it were ours).
- ``--resume`` refuses options that differ from the ones the run was started with (``runtime.*`` may
  differ: workers, device, address), instead of continuing a model under options that did not train it.
- One process at a time: a lock file (``<run>/.lock``, ``flock``) held for the whole run; the lock
  is released by the kernel if the process dies, so a crashed run never blocks its own resume.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import ExperimentConfig, flatten
from .errors import UserError
from .runtime.driver import CHECKPOINT, PREVIOUS
from .utils import exclusive_lock

RESULTS = "results.json"
LOCK = ".lock"
# What may change between a run and its --resume: where and how it runs, not what it computes.
FREE_ON_RESUME = ("runtime.", "out")


def _added_later() -> dict:
    """Options added after runs were first written, at their defaults: left out of the comparison and
    the hash, so a run started before they existed keeps its directory name and can be resumed."""
    import dataclasses

    from .config import WeightingConfig

    added = flatten({"weighting": dataclasses.asdict(WeightingConfig())})
    added.update({"aggregate.weighting": "none", "train.source": "teachers", "pool.black_box": False,
                  "learner.metric": "euclidean", "learner.metric_scale": 10.0})
    return json.loads(json.dumps(added))


ADDED_LATER = _added_later()


def _method_free_on_resume(method) -> tuple[str, ...]:
    """The method's options that only limit a run (``Method.free_on_resume``, e.g. a query budget)."""
    from .methods import METHODS

    return tuple(getattr(METHODS.get(method), "free_on_resume", ())) if method in METHODS else ()


def _comparable(cfg_dict: dict) -> dict:
    flat = flatten(json.loads(json.dumps(cfg_dict, default=str)))
    free = FREE_ON_RESUME + _method_free_on_resume(flat.get("method"))
    return {k: v for k, v in flat.items() if not k.startswith(free)
            and not (k in ADDED_LATER and ADDED_LATER[k] == v)}


def config_hash(cfg: ExperimentConfig) -> str:
    """8 hex digits over the options that decide the results (the data root made absolute)."""
    d = _comparable(cfg.to_dict())
    d["data.data_root"] = str(Path(cfg.data.data_root).resolve())
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / f"{cfg.scenario}-{cfg.label}-{cfg.profile}-s{cfg.seed}-{config_hash(cfg)}"


def option_differences(stored: dict, cfg: ExperimentConfig) -> list[str]:
    """``key=old there, new now`` for each result-deciding option that differs."""
    old, new = _comparable(stored), _comparable(cfg.to_dict())
    return [f"{k}={old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def check_run_dir(run_dir: Path, cfg: ExperimentConfig, resume: bool) -> None:
    """Refuse (one-line UserError, nothing touched) a directory this run must not write."""
    if resume:
        if not any((run_dir / c).is_file() for c in (CHECKPOINT, PREVIOUS)):
            raise UserError(f"--resume: no checkpoint at {run_dir / CHECKPOINT}")
        try:
            stored = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"--resume: {run_dir / 'config.json'} is missing or unreadable, so the options "
                            "the run was started with are unknown") from None
        diff = option_differences(stored, cfg)
        if diff:
            more = f" (and {len(diff) - 2} more)" if len(diff) > 2 else ""
            raise UserError(f"--resume: {run_dir} was started with other options: {'; '.join(diff[:2])}{more}; "
                            "resume with its options or choose another --out")
        return
    if (run_dir / RESULTS).exists():
        raise UserError(f"--out {run_dir}: a finished run is already there; choose another --out or delete it")
    if run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir()):
        if (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
            raise UserError(f"--out {run_dir}: an unfinished run is there; add --resume to continue it "
                            "or choose another --out")
        raise UserError(f"--out {run_dir}: a non-empty folder that is not a run directory; choose a new or "
                        "empty folder")


class RunLock:
    """``with RunLock(run_dir):`` -- this process alone writes ``run_dir`` (another gets a UserError)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._held = None

    def __enter__(self) -> "RunLock":
        self._held = exclusive_lock(self.path, f"--out {self.path.parent}")
        self._held.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._held is not None:
            self._held.__exit__(*exc)
            self._held = None


__all__ = ["RunLock", "check_run_dir", "config_hash", "default_run_dir", "option_differences"]
