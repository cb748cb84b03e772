"""TeacherPool: hosts a shard of the zoo and does the teacher-side work of a round.

The same class runs in-process (``--workers 0``) and as a Ray actor. It is stateless apart from the
loaded teachers: every call carries the round's inputs (the meta-model state as a flat vector that
the driver ``ray.put``s once per round) and is seeded by (experiment seed, round, teacher), so a
replacement actor redoes a lost call bit for bit.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data.augment import augment
from ..data.registry import get_spec
from ..synthesis.base import make_normalizer
from ..data.transforms import normalize
from ..zoo import load_teacher
from .parts import build_learner_for, build_meta_model, build_synthesizer, task_seed
from .pool import PoolEntry


class TeacherPool:
    def __init__(self, cfg: dict, entries: list[PoolEntry], device: str | None = None):
        from .cluster import worker_device

        self.cfg = ExperimentConfig.from_dict(cfg)
        self.device = torch.device(device) if device else worker_device(self.cfg.runtime.device)
        self.entries = {e.index: e for e in entries}
        self.teachers: dict[int, torch.nn.Module] = {}
        self.spec = get_spec(self.cfg.data.dataset)
        self.synth = build_synthesizer(self.cfg)
        self.meta_model = build_meta_model(self.cfg).to(self.device)
        self.learner = build_learner_for(self.cfg, self.meta_model)
        self.names = [n for n, _ in self.meta_model.named_parameters()]

    def ping(self) -> bool:
        return True

    def node_id(self) -> str | None:
        """The Ray node this pool runs on (None in-process): multi-node placement checks."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def teacher(self, index: int) -> torch.nn.Module:
        if index not in self.teachers:
            e = self.entries[index]
            self.teachers[index] = load_teacher(e.zoo_dir, e.record, self.device)
        return self.teachers[index]

    def _normalize(self, x01: torch.Tensor) -> torch.Tensor:
        return make_normalizer(self.spec.mean, self.spec.std, x01.device)(x01)

    def _params(self, theta: np.ndarray) -> dict[str, torch.Tensor]:
        from ..learners import unflatten

        like = {n: p for n, p in self.meta_model.named_parameters()}
        return unflatten(torch.from_numpy(np.asarray(theta, dtype=np.float32).copy()).to(self.device), like)

    # --- white-box recovery + per-teacher distillation gradient --------------------------------

    def recover(self, round_idx: int, teacher_ids: list[int], theta: np.ndarray | None) -> list[dict]:
        """Invert each teacher; with ``theta``, also its distillation gradient for the meta-model at theta."""
        params = self._params(theta) if theta is not None else None
        out = []
        for tid in teacher_ids:
            seed = task_seed(self.cfg.seed, round_idx, tid)
            teacher = self.teacher(tid)
            classes = self.entries[tid].record.classes
            rec = self.synth.synthesize(teacher, classes, self.spec.mean, self.spec.std, seed=seed)
            item = {"teacher": tid, "arch": self.entries[tid].record.arch,
                    "images": rec.images.cpu().numpy(), "labels": rec.labels.cpu().numpy(), "classes": rec.classes,
                    "teacher_acc": rec.teacher_acc, "inv_loss": rec.loss, "passes": rec.passes,
                    "synth_s": rec.seconds}
            if params is not None:
                t0 = time.perf_counter()
                grad, stats = self.distill_grad(teacher, rec.images, rec.labels, params, seed)
                item.update(grad=grad, kd_loss=stats["loss"], kd_acc=stats["acc"], grad_s=time.perf_counter() - t0)
            out.append(item)
        return out

    def distill_grad(self, teacher, images01, labels, params, seed: int) -> tuple[np.ndarray, dict]:
        """Meta-gradient of one teacher's recovered task: support/query split per class, teacher soft labels
        on the augmented images, the learner's objective with the distillation loss."""
        from ..learners import Task, flatten

        gen = torch.Generator().manual_seed(seed)
        x = images01.float()
        labels = torch.as_tensor(labels)
        shot = self.cfg.learner.train_shot
        s_idx, q_idx = [], []
        for j in range(int(labels.max()) + 1):
            rows = torch.nonzero(labels == j).flatten()
            rows = rows[torch.randperm(len(rows), generator=gen)]
            k = min(shot, len(rows) - 1)
            s_idx.append(rows[:k]); q_idx.append(rows[k:])
        s_idx, q_idx = torch.cat(s_idx), torch.cat(q_idx)
        xa = self._normalize(augment(x, self.cfg.train.augment, gen).to(self.device))
        with torch.no_grad():
            t_logits = teacher(xa)
        y = labels.to(self.device)
        task = Task(xa[s_idx], y[s_idx], xa[q_idx], y[q_idx], t_logits[s_idx], t_logits[q_idx])
        grads, stats = self.learner.meta_grads(params, task)
        return flatten(grads, self.names).detach().cpu().numpy().astype(np.float32), stats

    # --- PURER: gradients of the per-teacher inversion loss w.r.t. the shared synthetic rows ------

    def purer_grads(self, round_idx: int, rows: dict[int, np.ndarray], loss_cfg: dict) -> dict[int, dict]:
        from ..synthesis.purer import purer_teacher_loss

        out = {}
        for tid, x in rows.items():
            classes = self.entries[tid].record.classes
            rec = purer_teacher_loss(self.teacher(tid), classes, torch.from_numpy(np.asarray(x).copy()).to(self.device),
                                     self.spec.mean, self.spec.std, seed=task_seed(self.cfg.seed, round_idx, tid, 1),
                                     **loss_cfg)
            out[tid] = {"classes": classes, "loss": rec.loss, "acc": rec.teacher_acc,
                        "grad": rec.state_grad["rows"].detach().cpu().numpy()}
        return out
