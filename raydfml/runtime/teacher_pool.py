"""TeacherPool: hosts the zoo's teachers and does the teacher-side work of a round.

The same class runs in-process (``--workers 0``) and as a Ray actor. What it does for one teacher is
the method's business: ``work(hook, ...)`` calls the method's ``teacher_<hook>`` once per teacher and
returns typed records (see :mod:`raydfml.methods.base`). This class provides what those hooks share:
the teachers (lazily loaded, each seeing inputs at its own resolution), the meta-model at a broadcast
state, the configured per-teacher synthesizer, and the teacher's task and gradient for the meta-model.

It is stateless apart from the loaded teachers and a per-round cache: every call carries the round's
inputs (the meta-parameters as a flat vector that the driver ``ray.put``s once per round) and is
seeded by (experiment seed, round, teacher), so a replacement actor redoes a lost call bit for bit.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data.augment import augment
from ..data.registry import get_spec
from ..methods import create_method
from ..models import NativeResolution
from ..records import TaskArrays, TeacherRecord
from ..synthesis import build_synthesizer
from ..synthesis.base import make_normalizer
from ..zoo import load_teacher
from .parts import build_learner_for, build_meta_model, image_size
from .pool import PoolEntry


class TeacherPool:
    def __init__(self, cfg: dict, entries: list[PoolEntry], device: str | None = None):
        from ..cluster import worker_device

        self.cfg = ExperimentConfig.from_dict(cfg)
        self.device = torch.device(device) if device else worker_device(self.cfg.runtime.device)
        self.entries = {e.index: e for e in entries}
        self.teachers: dict[int, torch.nn.Module] = {}
        self.image_size = image_size(self.cfg)
        self.method = create_method(self.cfg)
        # A black-box pool (a method that learns through APIs only, or a scenario whose teachers are
        # APIs): hooks reach a teacher only through ``api(t)``; ``teacher(t)`` and everything built on
        # it (the white-box synthesizers, ``record``, ``teacher_task``) refuse with a one-line error.
        self.black_box = bool(self.cfg.pool.black_box or getattr(self.method, "black_box", False))
        self._modules: dict[int, torch.nn.Module] = {}      # loaded teacher modules (never handed out if black-box)
        self._synthesizer = None
        self.meta_model = build_meta_model(self.cfg).to(self.device)
        self.learner = build_learner_for(self.cfg, self.meta_model)
        self.names = [n for n, _ in self.meta_model.named_parameters()]
        self.cache: dict = {}              # the method's per-round scratch (e.g. tasks for a second pass)
        self._cache_round: int | None = None

    def ping(self) -> bool:
        return True

    def node_id(self) -> str | None:
        """The Ray node this pool runs on (None in-process): multi-node placement checks."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    # --- the one entry point ---------------------------------------------------------------------
    def work(self, hook: str, round_idx: int, teacher_ids: list[int], per_teacher: dict | None,
             *shared) -> tuple[list[TeacherRecord], list[TeacherRecord]]:
        """The method's ``teacher_<hook>(pool, round_idx, teacher, per_teacher[teacher], *shared)`` for
        each teacher, in order. Returns (summaries, records): the driver reads the summaries, the full
        records go on to the MetaLearner (on Ray: two return values, so the driver never fetches them)."""
        if round_idx != self._cache_round:
            self.cache, self._cache_round = {}, round_idx
        fn = self.method.teacher_hook(hook)
        records = [fn(self, round_idx, tid, None if per_teacher is None else per_teacher[tid], *shared)
                   for tid in teacher_ids]
        return [r.summary() for r in records], records

    # --- teachers --------------------------------------------------------------------------------
    def _module(self, index: int) -> torch.nn.Module:
        """Teacher ``index``'s module as trained (checksum-verified, ``weights_only`` load), loaded once."""
        if index not in self._modules:
            e = self.entries[index]
            self._modules[index] = load_teacher(e.zoo_dir, e.record, self.device)
        return self._modules[index]

    def teacher(self, index: int) -> torch.nn.Module:
        """Teacher ``index``, taking images at the working resolution: one trained at another size
        (md on real data: CIFAR-FS teachers at 32 px among 84-px ones) sees them resized to its own.
        A black-box pool refuses (one-line ``UserError``): its teachers are reachable only through ``api``."""
        if self.black_box:
            from ..blackbox import require_white_box

            require_white_box(self.api(index), "white-box access to a teacher (its module, weights or BN statistics)")
        if index not in self.teachers:
            net = self._module(index)
            size = self.entries[index].record.image_size
            self.teachers[index] = NativeResolution(net, size) if size != self.image_size else net
        return self.teachers[index]

    def api(self, index: int, output: str = "probs", input: str = "uint8", counts: dict | None = None,
            max_images: int | None = None, budget=None):
        """Teacher ``index`` as a ``blackbox.BlackBoxAPI`` named ``teacher <index>``: predict-only, with its
        global classes, its own resolution and dataset normalisation, and fresh query counters (set
        from ``counts``, this API's totals so far, when given). ``max_images`` caps this API's images,
        ``budget`` (a ``QueryBudget``) the run's. The module stays on this actor: the API never hands
        it out, and nothing a hook returns should hold the API itself."""
        from ..blackbox import BlackBoxAPI

        e, spec = self.entries[index], self.spec_of(index)
        api = BlackBoxAPI(self._module(index), spec.mean, spec.std, name=f"teacher {index}",
                          classes=self.classes_of(index), image_size=e.record.image_size, output=output,
                          input=input, max_images=max_images, budget=budget)
        if counts:
            api.restore({"api": api.name, **counts})
        return api

    def spec_of(self, tid: int):
        """The teacher's own dataset: its statistics normalise the teacher's inputs and, in the
        teacher's task, the meta-model's (as that dataset's real episodes are at meta-test)."""
        return get_spec(getattr(self.entries[tid], "dataset", None) or self.cfg.data.dataset)

    def classes_of(self, tid: int) -> tuple[int, ...]:
        """The teacher's global class ids in head order (domain offsets applied in md)."""
        e = self.entries[tid]
        return tuple(getattr(e, "global_classes", e.record.classes))

    def arch_of(self, tid: int) -> str:
        return self.entries[tid].record.arch

    # --- recovery --------------------------------------------------------------------------------
    @property
    def synthesizer(self):
        """The configured per-teacher synthesizer (``synth.name``), built on first use."""
        if self._synthesizer is None:
            self._synthesizer = build_synthesizer(self.cfg.synth, self.image_size)
        return self._synthesizer

    def synthesize(self, tid: int, seed: int):
        """Teacher ``tid``'s recovery with the configured synthesizer, seeded. It never depends on the
        meta-model, so with ``runtime.synth_cache`` set it is read back from that folder when an earlier
        run recovered the same teacher with the same synthesis options and seed (runs that differ only
        in what they do with the images, e.g. the learner or the task weighting, share their recoveries)."""
        if self.black_box:
            from ..blackbox import require_white_box

            require_white_box(self.api(tid), f"synthesizer {self.cfg.synth.name!r}")
        spec = self.spec_of(tid)
        cache = self._synth_cache_path(tid, seed)
        if cache is not None and cache.is_file():
            return self._read_recovery(cache)
        rec = self.synthesizer.synthesize(self.teacher(tid), self.classes_of(tid), spec.mean, spec.std, seed=seed)
        if cache is not None:
            self._write_recovery(cache, rec)
        return rec

    def _synth_cache_path(self, tid: int, seed: int):
        """``<runtime.synth_cache>/<key>.pt``; the key covers everything the recovery depends on."""
        folder = self.cfg.runtime.synth_cache
        if not folder:
            return None
        import dataclasses
        import hashlib
        import json
        from pathlib import Path

        e, spec = self.entries[tid], self.spec_of(tid)
        key = {"synth": dataclasses.asdict(self.cfg.synth), "image_size": self.image_size, "seed": int(seed),
               "teacher": e.record.sha256, "classes": list(self.classes_of(tid)),
               "mean": list(spec.mean), "std": list(spec.std), "device": self.device.type}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return Path(folder).expanduser().resolve() / f"{digest}.pt"

    @staticmethod
    def _write_recovery(path, rec) -> None:
        from ..utils import atomic_path

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"images": rec.images, "labels": rec.labels, "classes": list(rec.classes),
                        "teacher_acc": rec.teacher_acc, "loss": rec.loss, "passes": rec.passes,
                        "seconds": rec.seconds}, tmp)

    @staticmethod
    def _read_recovery(path):
        from ..synthesis.base import Recovered

        d = torch.load(path, weights_only=True)
        return Recovered(images=d["images"], labels=d["labels"], classes=tuple(d["classes"]),
                         teacher_acc=float(d["teacher_acc"]), loss=float(d["loss"]), passes=int(d["passes"]),
                         seconds=0.0)

    def record(self, tid: int, rec) -> TeacherRecord:
        """A ``TeacherRecord`` of a recovery (``synthesis.base.Recovered``), with the teacher's own label
        for exactly the stored (float16, clamped) images."""
        predicted, confidence = self.predict(tid, rec.images, with_confidence=True)
        return TeacherRecord(teacher=tid, arch=self.arch_of(tid), classes=tuple(rec.classes),
                             images=rec.images.cpu().numpy(), labels=rec.labels.cpu().numpy(),
                             predicted=predicted, confidence=confidence,
                             teacher_acc=rec.teacher_acc, inv_loss=rec.loss, passes=rec.passes, seconds=rec.seconds)

    def predict(self, tid: int, images01, batch: int = 256, with_confidence: bool = False):
        """Teacher ``tid``'s label (relative, argmax) for each [0, 1] image (eval mode, no gradient);
        with ``with_confidence`` also its softmax probability of that label."""
        spec = self.spec_of(tid)
        norm = make_normalizer(spec.mean, spec.std, self.device)
        x = torch.as_tensor(images01)
        probs = []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                logits = self.teacher(tid)(norm(x[i:i + batch].to(self.device, torch.float32)))
                probs.append(torch.softmax(logits.float(), dim=1).cpu())
        p = torch.cat(probs) if probs else torch.zeros(0, 1)
        conf, labels = p.max(dim=1)
        labels = labels.numpy().astype(np.int64)
        return (labels, conf.numpy().astype(np.float32)) if with_confidence else labels

    # --- the teacher's contribution to the meta-update --------------------------------------------
    def teacher_task(self, tid: int, images01, labels, seed: int):
        """One teacher's recovered images as a task: per-image augmentation, normalisation, the
        teacher's logits on exactly those inputs, and a per-class support/query split (``train_shot``
        support images per class, the rest query)."""
        from ..learners import Task

        gen = torch.Generator().manual_seed(seed)
        x = torch.as_tensor(images01).float()
        labels = torch.as_tensor(labels)
        shot = self.cfg.learner.train_shot
        s_idx, q_idx = [], []
        for j in range(int(labels.max()) + 1):
            rows = torch.nonzero(labels == j).flatten()
            rows = rows[torch.randperm(len(rows), generator=gen)]
            k = min(shot, len(rows) - 1)
            s_idx.append(rows[:k]); q_idx.append(rows[k:])
        s_idx, q_idx = torch.cat(s_idx), torch.cat(q_idx)
        x_aug = augment(x, self.cfg.train.augment, gen).to(self.device)
        spec = self.spec_of(tid)
        xa = make_normalizer(spec.mean, spec.std, x_aug.device)(x_aug)
        with torch.no_grad():   # the teacher's logits on exactly the meta-model's inputs
            t_logits = self.teacher(tid)(xa)
        y = labels.to(self.device)
        return Task(xa[s_idx], y[s_idx], xa[q_idx], y[q_idx], t_logits[s_idx], t_logits[q_idx])

    def contribute(self, record: TeacherRecord, tid: int, rec, seed: int, theta, needs: str) -> None:
        """Add what the aggregation rule ``needs`` to ``record``: the teacher's task itself (``task``), or
        its gradient at the meta-parameters ``theta`` (``meta_grad`` or ``task_grad``). The task is
        kept in ``cache`` for a second pass this round."""
        task = self.cache[("task", tid)] = self.teacher_task(tid, rec.images, rec.labels, seed)
        if needs == "task":
            record.task = TaskArrays.from_task(task)
        else:
            self.gradient_into(record, task, theta, needs)

    def gradient_into(self, record: TeacherRecord, task, theta, needs: str) -> None:
        """``record.grad``/``loss``/``accuracy`` from the teacher's ``task`` at the flat state ``theta``:
        the learner's meta-gradient (``meta_grad``, distillation on the query) or the gradient of the
        whole-task loss ``L_i`` (``task_grad``, the per-teacher loss of the alignment rules)."""
        t0 = time.perf_counter()
        params = self.params(theta)
        if needs == "meta_grad":
            grad, stats = self._meta_grad(task, params)
        elif needs == "task_grad":
            grad, stats = self._task_grad(task, params)
        else:
            raise ValueError(f"a gradient needs meta_grad or task_grad, got {needs!r}")
        record.grad, record.loss = grad, float(stats["loss"])
        record.accuracy = float(stats.get("acc", float("nan")))
        record.seconds += time.perf_counter() - t0

    def params(self, theta: np.ndarray) -> dict[str, torch.Tensor]:
        """The meta-parameters from their flat broadcast vector, on this pool's device."""
        from ..learners import unflatten

        like = {n: p for n, p in self.meta_model.named_parameters()}
        return unflatten(torch.from_numpy(np.asarray(theta, dtype=np.float32).copy()).to(self.device), like)

    def _meta_grad(self, task, params) -> tuple[np.ndarray, dict]:
        from ..learners import flatten

        grads, stats = self.learner.meta_grads(params, task)
        return flatten(grads, self.names).detach().cpu().numpy().astype(np.float32), stats

    def _task_grad(self, task, params) -> tuple[np.ndarray, dict]:
        """Gradient of ``L_i(θ)`` = the learner's distillation loss of the teacher's task (``Learner.task_loss``)."""
        from ..learners import flatten

        leaves = {n: v.detach().requires_grad_(True) for n, v in params.items()}
        with torch.enable_grad():
            loss = self.learner.task_loss(leaves, task)
            gs = torch.autograd.grad(loss, [leaves[n] for n in self.names], allow_unused=True)
        grads = {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(self.names, gs)}
        return flatten(grads, self.names).detach().cpu().numpy().astype(np.float32), {"loss": float(loss.detach())}
