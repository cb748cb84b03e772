"""Where a zoo build's time goes: the driver's phases and each teacher's, for the scaling benchmark.

``build_zoo(..., times=BuildTimes())`` fills one of these as it goes; ``breakdown()`` sums it into
the rows ``benchmarks/zoo_scaling.py`` prints. Clock times (``queued``, ``started``, ``finished``) are
``time.time()`` seconds, so they compare across the processes of one machine (Ray workers on other
machines have their own clocks); durations are ``time.perf_counter()`` differences.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field


@dataclass
class TeacherTimes:
    """One teacher: when the driver queued it, when and where its training ran, what that cost."""
    teacher: int
    queued: float = 0.0               # clock time the driver submitted it (in-process: began it)
    started: float = 0.0              # clock time its training function began (after any worker start-up)
    finished: float = 0.0             # clock time its training function returned
    worker: int = 0                   # process id of the process that trained it
    threads: int = 0                  # torch's intra-op threads there
    data: float = 0.0                 # s: selecting and normalising its rows
    train: float = 0.0                # s: building the model and the optimisation steps
    evaluate: float = 0.0             # s: held-out accuracy after every epoch (and best-state copies)
    user: float = 0.0                 # CPU s in user space during its training
    system: float = 0.0               # CPU s in the kernel (mostly page faults) during its training
    page_faults: int = 0              # minor page faults during its training
    kept_freed_memory: bool = False   # whether build.keep_freed_memory() took effect in its worker


@dataclass
class BuildTimes:
    """One ``build_zoo`` call. ``workers`` 0 means in-process."""
    workers: int = 0
    start: float = field(default_factory=time.time)
    data: float = 0.0                 # s: the driver reading the split (ensure_dataset + load_split)
    ray_start: float = 0.0            # s: ensure_ray (0 when Ray was already running)
    put: float = 0.0                  # s: the split into Ray's object store (once per build)
    write: float = 0.0                # s: the driver saving teacher files, checksums and the manifest
    total: float = 0.0                # s: the whole call
    teachers: list[TeacherTimes] = field(default_factory=list)

    def breakdown(self) -> dict[str, float]:
        """The build's wall time split into its parts (seconds), plus how busy the workers were.

        ``worker_start`` is, per worker process, the wait of its first teacher between being queued
        and starting (process start, imports, fetching the arguments), summed over workers; ``busy``
        is the share of ``max(1, workers) x total`` spent inside the teachers' training functions;
        ``cpu_per_teacher`` the mean CPU seconds (user + kernel) of a teacher's training, which other
        processes on the machine inflate far less than its wall time.
        """
        first: dict[int, TeacherTimes] = {}
        for t in sorted(self.teachers, key=lambda t: t.started):
            first.setdefault(t.worker, t)
        busy = sum(t.finished - t.started for t in self.teachers)
        return {"total": self.total, "ray_start": self.ray_start, "data": self.data, "put": self.put,
                "worker_start": sum(t.started - t.queued for t in first.values()),
                "teacher_data": sum(t.data for t in self.teachers),
                "train": sum(t.train for t in self.teachers),
                "evaluate": sum(t.evaluate for t in self.teachers),
                "system": sum(t.system for t in self.teachers),
                "cpu_per_teacher": sum(t.user + t.system for t in self.teachers) / max(1, len(self.teachers)),
                "page_faults": float(sum(t.page_faults for t in self.teachers)),
                "write": self.write, "busy": busy / (max(1, self.workers) * self.total) if self.total else 0.0,
                "threads": float(max((t.threads for t in self.teachers), default=0))}


class Stopwatch:
    """CPU time and page faults of this process over a block, for one ``TeacherTimes``."""

    def __init__(self, times: TeacherTimes):
        self.times = times

    def __enter__(self) -> "Stopwatch":
        import torch

        self.times.started, self.times.worker, self.times.threads = time.time(), os.getpid(), torch.get_num_threads()
        self._usage = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.times.finished = time.time()
        self.times.user = usage.ru_utime - self._usage.ru_utime
        self.times.system = usage.ru_stime - self._usage.ru_stime
        self.times.page_faults = usage.ru_minflt - self._usage.ru_minflt


__all__ = ["BuildTimes", "Stopwatch", "TeacherTimes"]
