"""TeacherPool: hosts a shard of the zoo and does the teacher-side work of a round.

The same class runs in-process (``--workers 0``) and as a Ray actor. It is stateless apart from the
loaded teachers: every call carries the round's inputs (the meta-model state as a flat vector that
the driver ``ray.put``s once per round) and is seeded by (experiment seed, round, teacher), so a
replacement actor redoes a lost call bit for bit.

What a round asks of it, by method:

- ``recover``: invert each teacher (pixel / generator synthesizers) and, given the meta-model state,
  return its per-teacher gradient: the learner's meta-gradient (``grad="meta"``, the mean rule) or the
  gradient of the whole-task loss ``L_i`` (``grad="task"``, TGR's phase 1). The teacher's task is kept
  for the round so TGR's phase 2 (``task_grads`` at displaced states) needs no second inversion.
- ``recover_free``: adapt the broadcast FREE meta-generator to each teacher (first-order meta-gradient
  back), optionally with the adversarial term against the meta-model.
- ``embed``: TGR's task embedding of teachers (diagonal Fisher of a probe on recovered data).
- ``purer_grads``: PURER's per-teacher gradients w.r.t. the shared synthetic rows.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data.augment import augment
from ..data.registry import get_spec
from ..synthesis.base import make_normalizer
from ..models import NativeResolution
from ..zoo import load_teacher
from .parts import build_learner_for, build_meta_model, build_synthesizer, image_size, task_seed
from .pool import PoolEntry


class TeacherPool:
    def __init__(self, cfg: dict, entries: list[PoolEntry], device: str | None = None):
        from .cluster import worker_device

        self.cfg = ExperimentConfig.from_dict(cfg)
        self.device = torch.device(device) if device else worker_device(self.cfg.runtime.device)
        self.entries = {e.index: e for e in entries}
        self.teachers: dict[int, torch.nn.Module] = {}
        self.synth = build_synthesizer(self.cfg)
        self.meta_model = build_meta_model(self.cfg).to(self.device)
        self.learner = build_learner_for(self.cfg, self.meta_model)
        self.names = [n for n, _ in self.meta_model.named_parameters()]
        self._tasks: dict[tuple[int, int], object] = {}     # (round, teacher) -> its Task, this round only
        self._gen_like = None                                # FREE: a generator skeleton for unflattening

    def ping(self) -> bool:
        return True

    def node_id(self) -> str | None:
        """The Ray node this pool runs on (None in-process): multi-node placement checks."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def teacher(self, index: int) -> torch.nn.Module:
        """Teacher ``index``, taking images at the working resolution: one trained at another size
        (md on real data: CIFAR-FS teachers at 32 px among 84-px ones) sees them resized to its own."""
        if index not in self.teachers:
            e = self.entries[index]
            net = load_teacher(e.zoo_dir, e.record, self.device)
            if e.record.image_size != image_size(self.cfg):
                net = NativeResolution(net, e.record.image_size)
            self.teachers[index] = net
        return self.teachers[index]

    def spec_of(self, tid: int):
        """The teacher's own dataset: its statistics normalise the teacher's inputs and, in the
        teacher's task, the meta-model's (as that dataset's real episodes are at meta-test)."""
        return get_spec(getattr(self.entries[tid], "dataset", None) or self.cfg.data.dataset)

    def _params(self, theta: np.ndarray) -> dict[str, torch.Tensor]:
        from ..learners import unflatten

        like = {n: p for n, p in self.meta_model.named_parameters()}
        return unflatten(torch.from_numpy(np.asarray(theta, dtype=np.float32).copy()).to(self.device), like)

    # --- white-box recovery + per-teacher gradients ----------------------------------------------

    def classes_of(self, tid: int) -> tuple[int, ...]:
        """The teacher's global class ids in head order (domain offsets applied in md)."""
        e = self.entries[tid]
        return tuple(getattr(e, "global_classes", e.record.classes))

    def _recover_one(self, tid: int, seed: int):
        spec = self.spec_of(tid)
        return self.synth.synthesize(self.teacher(tid), self.classes_of(tid), spec.mean, spec.std, seed=seed)

    def _item(self, tid: int, rec) -> dict:
        return {"teacher": tid, "arch": self.entries[tid].record.arch,
                "images": rec.images.cpu().numpy(), "labels": rec.labels.cpu().numpy(), "classes": rec.classes,
                "teacher_acc": rec.teacher_acc, "inv_loss": rec.loss, "passes": rec.passes, "synth_s": rec.seconds}

    def recover(self, round_idx: int, teacher_ids: list[int], theta: np.ndarray | None, grad: str = "meta",
                return_task: bool = False) -> list[dict]:
        """Invert each teacher; with ``theta``, also its gradient for the meta-model at theta.

        ``grad="meta"``: the learner's meta-gradient of the teacher's task (distillation on the query);
        ``grad="task"``: the gradient of the whole-task loss ``L_i`` (FREE/TGR's per-teacher loss).
        ``return_task``: the task itself travels back too (for aggregation in the MetaLearner).
        """
        params = self._params(theta) if theta is not None else None
        self._tasks = {k: v for k, v in self._tasks.items() if k[0] == round_idx}
        out = []
        for tid in teacher_ids:
            seed = task_seed(self.cfg.seed, round_idx, tid)
            rec = self._recover_one(tid, seed)
            item = self._item(tid, rec)
            if params is not None or return_task:
                task = self.teacher_task(tid, rec.images, rec.labels, seed)
                self._tasks[(round_idx, tid)] = task
                if return_task:
                    item["task"] = task_to_numpy(task)
            if params is not None:
                t0 = time.perf_counter()
                g, stats = (self._meta_grad(task, params) if grad == "meta" else self._task_grad(task, params))
                item.update(grad=g, kd_loss=stats["loss"], kd_acc=stats.get("acc", float("nan")),
                            grad_s=time.perf_counter() - t0)
            out.append(item)
        return out

    def task_grads(self, round_idx: int, thetas: dict[int, np.ndarray]) -> dict[int, dict]:
        """TGR phase 2: ``G_i = grad L_i`` at teacher i's displaced state ``thetas[i]``, on the task that
        ``recover`` built this round (rebuilt, identically, if this actor is a replacement)."""
        out = {}
        for tid, theta in thetas.items():
            task = self._tasks.get((round_idx, tid))
            if task is None:
                seed = task_seed(self.cfg.seed, round_idx, tid)
                rec = self._recover_one(tid, seed)
                task = self._tasks[(round_idx, tid)] = self.teacher_task(tid, rec.images, rec.labels, seed)
            g, stats = self._task_grad(task, self._params(theta))
            out[tid] = {"grad": g, "loss": stats["loss"]}
        return out

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

    def _meta_grad(self, task, params) -> tuple[np.ndarray, dict]:
        from ..learners import flatten

        grads, stats = self.learner.meta_grads(params, task)
        return flatten(grads, self.names).detach().cpu().numpy().astype(np.float32), stats

    def _task_grad(self, task, params) -> tuple[np.ndarray, dict]:
        """Gradient of ``L_i(θ)`` = the learner's task loss (KD + CE) on all of the task's images."""
        from ..aggregation.tgr import task_losses
        from ..learners import flatten

        loss_fn = task_losses(self.learner, [task])[0]
        leaves = {n: v.detach().requires_grad_(True) for n, v in params.items()}
        with torch.enable_grad():
            loss = loss_fn(leaves)
            gs = torch.autograd.grad(loss, [leaves[n] for n in self.names], allow_unused=True)
        grads = {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(self.names, gs)}
        return flatten(grads, self.names).detach().cpu().numpy().astype(np.float32), {"loss": float(loss.detach())}

    # --- FREE: adapt the broadcast meta-generator to each teacher -------------------------------

    def recover_free(self, round_idx: int, teacher_ids: list[int], gen_state: np.ndarray,
                     theta: np.ndarray | None) -> list[dict]:
        """Adapt the meta-generator (flat ``gen_state``) to each teacher in ``synth.adapt_steps`` steps.

        With ``theta`` (after warm-up) the adversarial term uses the meta-model at theta as the
        student, and the recovered task travels back for the alignment step. Each item carries
        ``state_grad``: the flat first-order meta-gradient for the meta-generator.
        """
        from ..learners import flatten, unflatten
        from ..synthesis.free import adapt_generator, new_generator
        from torch.func import functional_call

        sc = self.cfg.synth
        if self._gen_like is None:
            self._gen_like = dict(new_generator(0, nz=sc.nz, ngf=sc.ngf, image_size=image_size(self.cfg)).named_parameters())
        state = unflatten(torch.from_numpy(np.asarray(gen_state, dtype=np.float32).copy()), self._gen_like)
        student = None
        if theta is not None:
            params = {n: v.detach() for n, v in self._params(theta).items()}
            student = lambda x: functional_call(self.meta_model, params, (x,))  # noqa: E731
        out = []
        for tid in teacher_ids:
            seed = task_seed(self.cfg.seed, round_idx, tid)
            teacher = self.teacher(tid)
            spec = self.spec_of(tid)
            rec = adapt_generator(state, teacher, self.classes_of(tid), spec.mean, spec.std, seed,
                                  steps=sc.adapt_steps, per_class=sc.per_class, lr_generator=sc.lr_generator,
                                  lr_latent=sc.lr_latent, ngf=sc.ngf, nz=sc.nz, image_size=image_size(self.cfg),
                                  augment=sc.augment, ce_weight=sc.ce_weight, bn_weight=sc.bn_weight,
                                  student_forward=student, adv_weight=sc.adv_weight)
            item = self._item(tid, rec)
            item["state_grad"] = flatten(rec.state_grad, list(self._gen_like)).numpy().astype(np.float32)
            if theta is not None:
                item["task"] = task_to_numpy(self.teacher_task(tid, rec.images, rec.labels, seed))
            out.append(item)
        return out

    # --- TGR: task embeddings -------------------------------------------------------------------

    def embed(self, round_idx: int, teacher_ids: list[int], probe: str = "random") -> list[dict]:
        """Recover each teacher's data and embed it as the diagonal Fisher of a fixed probe network.

        ``probe="random"``: a seeded random Conv4 (the same on every actor: a function of the seed);
        ``"teacher"``: pool teacher 0 (a trained network; the same for every teacher embedded). Items
        are ``recover``'s plus ``embedding`` (flat float32). Seeded apart from the training rounds.
        """
        from ..aggregation.task_space import fisher_embedding, make_probe

        if probe == "teacher":
            net = self.teacher(0)
        else:
            net = make_probe(task_seed(self.cfg.seed, 41), image_size=image_size(self.cfg),
                             adaptive_pool=self.cfg.learner.adaptive_pool, way=self.cfg.pool.way).to(self.device)
        out = []
        for tid in teacher_ids:
            seed = task_seed(self.cfg.seed, 43, round_idx, tid)
            rec = self._recover_one(tid, seed)
            item = self._item(tid, rec)
            spec = self.spec_of(tid)
            emb = fisher_embedding(net, rec.images, rec.labels, spec.mean, spec.std, seed=seed)
            item["embedding"] = emb.cpu().numpy().astype(np.float32)
            out.append(item)
        return out

    # --- PURER: gradients of the per-teacher inversion loss w.r.t. the shared synthetic rows ------

    def purer_grads(self, round_idx: int, rows: dict[int, np.ndarray], loss_cfg: dict) -> dict[int, dict]:
        from ..synthesis.purer import purer_teacher_loss

        out = {}
        for tid, x in rows.items():
            classes, spec = self.classes_of(tid), self.spec_of(tid)
            rec = purer_teacher_loss(self.teacher(tid), classes, torch.from_numpy(np.asarray(x).copy()).to(self.device),
                                     spec.mean, spec.std, seed=task_seed(self.cfg.seed, round_idx, tid, 1),
                                     **loss_cfg)
            out[tid] = {"classes": classes, "loss": rec.loss, "acc": rec.teacher_acc,
                        "grad": rec.state_grad["rows"].detach().cpu().numpy()}
        return out


def task_to_numpy(task) -> dict[str, np.ndarray | None]:
    """A ``Task`` as numpy arrays (what crosses the object store), ``task_from_numpy`` inverts it."""
    return {k: (None if v is None else v.detach().cpu().numpy()) for k, v in vars(task).items()}


def task_from_numpy(d: dict, device) -> object:
    from ..learners import Task

    return Task(**{k: (None if v is None else torch.from_numpy(np.asarray(v).copy()).to(device)) for k, v in d.items()})
