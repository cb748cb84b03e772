"""Starting or joining Ray, and the resources our actors and tasks ask for."""
from __future__ import annotations

import math
import os
from pathlib import Path

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


def ensure_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None):
    """Start a local Ray instance (or join ``address``) unless one is already running in this process.

    Workers get the package on PYTHONPATH even when raydfml is not pip-installed: a cluster's through
    the job's runtime environment; a local instance's through the environment its processes inherit
    from this one. (A job-level runtime environment makes a local Ray start new workers for it instead
    of using the ones it started with, which cost the first task of each worker ~0.9 s: a zoo build's
    serial start-up.) This process's own environment is left as it was.
    """
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    old_path = os.environ.get("PYTHONPATH")
    path = os.pathsep.join(p for p in [_PACKAGE_PARENT, old_path or ""] if p)
    kwargs: dict = dict(include_dashboard=False, log_to_driver=False)
    if address:
        kwargs["address"] = address
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
    else:
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
        os.environ["PYTHONPATH"] = path             # inherited by the raylet, and by the workers it starts
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        # A bad --address, a port in use, a full temp dir: say so in one line, with what to try.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        where = f"--address {address}" if address else "a local Ray instance"
        hint = ("check that the cluster is up (`ray status`) and the address is right" if address else
                "check free disk space in the temp dir (RAY_TMPDIR) and that no stale Ray holds its ports "
                "(`ray stop`), or run in-process with --workers 0")
        from .errors import UserError

        raise UserError(f"Ray did not start ({where}): {first}; {hint}") from None
    finally:
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
    return ray


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def gpu_fraction(workers: int) -> float:
    """GPU share for each of ``workers`` concurrent actors/tasks: 0 without GPUs, else a fraction <= 1."""
    gpus = cluster_gpus()
    if gpus <= 0 or workers <= 0:
        return 0.0
    return round(min(1.0, gpus / workers), 4)


def actor_cpu_share(actors: int) -> float:
    """CPU request per actor so that ``actors`` of them fit at once (at most 1 each).

    The TeacherPool actors and the MetaLearner take turns within a round (synthesis, then replay),
    so sharing the cores logically keeps every core busy without leaving an actor unscheduled.
    """
    import ray

    cpus = float(ray.available_resources().get("CPU", 1.0)) if ray.is_initialized() else 1.0
    return max(0.01, math.floor(min(1.0, cpus / max(1, actors)) * 100) / 100)  # floor: shares must fit


def worker_device(prefer: str = "auto", threads: int = 1):
    """Device inside a Ray worker: CUDA when Ray assigned us a GPU, else CPU with one thread.

    On a 2-core machine, actors that each use all cores fight for them; one thread each scales.
    """
    import torch

    try:
        import ray

        gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", []) if ray.is_initialized() else []
    except Exception:  # not inside Ray
        gpu_ids = []
    if prefer != "cpu" and gpu_ids and torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(max(1, threads))
    return torch.device("cpu")
