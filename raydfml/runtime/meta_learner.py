"""MetaLearner: owns the meta-model, its optimiser, the task memory bank and meta-validation.

One instance per experiment, in-process or as a Ray actor. It banks the teachers' recovered images,
makes the meta-update from their per-teacher records with the configured aggregation rule, holds
the method's central state (``Method.init_central``; e.g. FREE's meta-generator, PURER's dataset) and
runs its central hooks, replays tasks, and keeps the parameters that scored best on meta-val (model
selection never looks at meta-test). Records from the TeacherPool arrive as object references.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch

from ..aggregation import RuleContext, build_rule, build_weighting
from ..aggregation.weighting import Uniform
from ..config import ExperimentConfig
from ..data.augment import augment
from ..data.registry import get_spec
from ..methods import create_method
from ..records import merge
from ..utils import task_seed
from .bank import TaskMemoryBank
from .parts import build_learner_for, build_meta_model, image_size, meta_split
from .pool import CLASS_OFFSET_STRIDE, class_dataset, pool_datasets


class MetaLearner:
    def __init__(self, cfg: dict, pool_classes: list[int], device: str | None = None, load_val: bool = True):
        from ..cluster import worker_device

        self.cfg = ExperimentConfig.from_dict(cfg)
        self.device = torch.device(device) if device else worker_device(self.cfg.runtime.device,
                                                                         threads=self.cfg.runtime.meta_threads)
        torch.manual_seed(task_seed(self.cfg.seed, 1))
        self.model = build_meta_model(self.cfg).to(self.device)
        self.learner = build_learner_for(self.cfg, self.model)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.params = {n: p.detach().clone().requires_grad_(True) for n, p in self.model.named_parameters()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=self.cfg.learner.outer_lr)
        # train.kd_optimizer=own: the per-teacher meta-update keeps its own Adam moments. Shared (the
        # seeds), a per-teacher gradient much larger than replay's (FREE's alignment x67, a KD loss of a
        # fresh teacher) fills the second moment and shrinks every replay step that follows.
        self.kd_opt = (torch.optim.Adam(list(self.params.values()), lr=self.cfg.learner.outer_lr)
                       if self.cfg.train.kd_optimizer == "own" else self.opt)
        self.bank = TaskMemoryBank(self.cfg.train.bank_per_class)
        self.rng = np.random.default_rng([self.cfg.seed, 23])
        self.aug_gen = torch.Generator().manual_seed(task_seed(self.cfg.seed, 29))
        self.meta_updates = 0
        self.best_val = -1.0
        self.best_round = -1
        self.best_params = {n: p.detach().clone() for n, p in self.params.items()}
        self.pool_classes = list(pool_classes)
        self.image_size = image_size(self.cfg)
        self.rule = build_rule(self.cfg)
        # Task weighting (aggregate.weighting): one instance per kind of update, each with its own keys.
        self.weighting = {where: build_weighting(self.cfg, where) for where in ("teachers", "replay")}
        self.weight_rng = np.random.default_rng([self.cfg.seed, 37])   # SPSA's perturbation directions
        # train.source=real: replay draws real meta-train episodes instead of the method's tasks.
        self.real = None
        if self.cfg.train.source == "real":
            from .real import RealEpisodes

            self.real = RealEpisodes(self.cfg)
        self.method = create_method(self.cfg)
        self.method.init_central(self)            # the method's own state (FREE's meta-generator, PURER's dataset)
        self.val_splits = {}                      # domain -> meta_val split (one entry outside md)
        if load_val:
            self.val_splits = {d: meta_split(self.cfg, d, "meta_val") for d in pool_datasets(self.cfg)}

    # --- helpers -----------------------------------------------------------------------------

    def ping(self) -> bool:
        return True

    def normalize(self, x01: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
        """Each row with its class's dataset statistics (``labels[i]`` indexes ``classes``).

        The meta-model meets every domain as its real episodes are normalised at meta-test (md on
        real data: CIFAR-FS rows with CIFAR statistics, miniImageNet/CUB rows with ImageNet's), so a
        task that mixes domains is normalised row by row.
        """
        specs = [get_spec(class_dataset(self.cfg, c)) for c in classes]
        mean = torch.tensor([s.mean for s in specs], dtype=x01.dtype, device=x01.device)
        std = torch.tensor([s.std for s in specs], dtype=x01.dtype, device=x01.device)
        idx = torch.as_tensor(labels, device=x01.device)
        return (x01 - mean[idx][:, :, None, None]) / std[idx][:, :, None, None]

    def step(self, grads: torch.Tensor | dict[str, torch.Tensor], opt: torch.optim.Optimizer | None = None) -> float:
        """One meta-update with the outer optimiser (or ``opt``) from ``grads`` (flat, or keyed like the
        parameters); returns the gradient's norm."""
        from ..learners import unflatten

        if torch.is_tensor(grads):
            norm = float(grads.norm())
            grads = unflatten(grads.to(self.device), self.params)
        else:
            norm = float(torch.cat([g.flatten() for g in grads.values()]).norm())
        self._step(grads, opt)
        return norm

    def _step(self, grads: dict[str, torch.Tensor], opt: torch.optim.Optimizer | None = None) -> None:
        opt = opt or self.opt
        opt.zero_grad(set_to_none=True)
        for n, p in self.params.items():
            g = grads.get(n)
            p.grad = None if g is None else g.detach().to(p.device)
        self._last_grad = {n: g.detach() for n, g in grads.items()}
        opt.step()
        self.meta_updates += 1

    def last_meta_grad(self) -> np.ndarray:
        """The gradient of the last meta-update, flat (what tests compare across executors)."""
        return torch.cat([self._last_grad.get(n, torch.zeros_like(p)).flatten()
                          for n, p in self.params.items()]).cpu().numpy()

    def flat_params(self) -> np.ndarray:
        return torch.cat([self.params[n].detach().flatten() for n in self.names]).cpu().numpy()

    def export_params(self, best: bool = True) -> dict[str, torch.Tensor]:
        src = self.best_params if best else self.params
        return {n: p.detach().cpu().clone() for n, p in src.items()}

    # --- what the round plan asks of the MetaLearner --------------------------------------------

    def central(self, hook: str, round_idx: int, args: tuple = (), *parts):
        """The method's ``central_<hook>(self, round_idx, records, *args)``; ``parts`` are the
        TeacherPool shares' records (resolved object references on Ray), merged in teacher order."""
        return self.method.central_hook(hook)(self, round_idx, merge(parts), *args)

    def bank_records(self, *parts) -> None:
        """The records' recovered images into the task memory bank, in teacher order.

        ``train.bank_filter``: ``none`` banks every image under the label it was recovered for;
        ``agree`` only those whose teacher predicts that label; ``relabel`` every image under the
        teacher's own label. The bank keeps, per image, whether the teacher agreed (``bank/disputed``).
        """
        mode = self.cfg.train.bank_filter
        for r in merge(parts):
            images, labels = torch.from_numpy(np.asarray(r.images)), torch.from_numpy(np.asarray(r.labels))
            pred = None if r.predicted is None else torch.from_numpy(np.asarray(r.predicted))
            agree = None if pred is None else pred == labels
            if pred is not None and mode == "agree":
                images, labels, agree = images[agree], labels[agree], agree[agree]
            elif pred is not None and mode == "relabel":
                labels, agree = pred, torch.ones_like(agree)
            self.bank.add(images, labels, tuple(r.classes), agree=agree)

    def aggregate(self, round_idx: int, *parts) -> dict:
        """One meta-update from the records' per-teacher contributions with the configured rule; with
        a task weighting, each teacher's contribution is scaled by its weight first (mean 1)."""
        records = merge(parts)
        ctx = RuleContext(learner=self.learner, params=self.params, device=self.device,
                          outer_lr=self.cfg.learner.outer_lr)
        weighting = self._weighting("teachers", round_idx)
        keys = lam = None
        if not isinstance(weighting, Uniform):
            keys = [self._record_keys(weighting, r) for r in records]
            lam = weighting.weights(keys)
            records = [dataclasses.replace(r, grad=(np.asarray(r.grad) * np.float32(w)).astype(np.float32))
                       for r, w in zip(records, lam)]
        grads, stats = self.rule(records, ctx)
        stats = dict(stats)
        out = {"kd/grad_norm": self.step(grads, self.kd_opt)}
        loss = stats.pop("loss", None)
        out["kd/loss"] = float(np.mean([r.loss for r in records])) if loss is None else float(loss)
        out.update(stats)
        if keys is not None:
            weighting.step(keys, [r.loss for r in records], self.weight_rng)   # from the pre-step losses
            out.update(weighting.summary("teachers"))
        return out

    def displace(self, *parts) -> tuple[dict[int, np.ndarray], dict]:
        """A two-pass rule's per-teacher states (flat) for the second pass, keyed by teacher."""
        records = merge(parts)
        theta = torch.from_numpy(self.flat_params())
        thetas, stats = self.rule.displace(records, theta)
        return {r.teacher: th.numpy() for r, th in zip(records, thetas)}, stats

    # --- replay tasks: the method's (the bank by default) or real episodes ----------------------

    def _sample_task(self):
        """One replay task and its global classes, or None: a real meta-train episode
        (``train.source=real``; normalised as at meta-test, not augmented, as the with-data baseline)
        or the method's task (the bank by default; augmented with ``train.augment``)."""
        from ..data.transforms import normalize
        from ..learners import Task

        if self.real is not None:
            d, ep = self.real.next()
            spec = self.real.splits[d].spec
            task = Task(normalize(ep.support, spec, self.device), ep.support_labels.to(self.device),
                        normalize(ep.query, spec, self.device), ep.query_labels.to(self.device))
            return task, self.real.global_classes(d, ep)
        t = self.cfg.train
        sampled = self.method.sample_task(self)
        if sampled is None:
            return None
        x_s, y_s, x_q, y_q = (v.detach() if torch.is_tensor(v) else v for v in sampled[:4])
        classes = sampled[4]
        x_s = self.normalize(augment(x_s.float(), t.augment, self.aug_gen).to(self.device), y_s, classes)
        x_q = self.normalize(augment(x_q.float(), t.augment, self.aug_gen).to(self.device), y_q, classes)
        return Task(x_s, y_s.to(self.device), x_q, y_q.to(self.device)), tuple(int(c) for c in classes)

    # --- task weighting ---------------------------------------------------------------------------

    def _weighting(self, where: str, round_idx: int):
        """The weighting of ``where``, switched on from round ``weighting.start`` (uniform before)."""
        w = self.weighting[where]
        w.active = round_idx >= self.cfg.weighting.start
        return w

    def _record_keys(self, weighting, record) -> tuple[str, ...]:
        """A teacher record's keys: the teacher, or its classes for a per-class weighting."""
        if getattr(weighting, "keys_by_class", False):
            return self._class_keys(record.classes)
        return (f"t{int(record.teacher)}",)

    def _class_keys(self, classes) -> tuple[str, ...]:
        """Keys of a task's global classes: ``c<id>``, or ``d<domain>`` with ``weighting.key=domain``."""
        if self.cfg.weighting.key == "domain":
            return tuple(sorted({f"d{int(c) // CLASS_OFFSET_STRIDE}" for c in classes}))
        return tuple(f"c{int(c)}" for c in classes)

    def method_report(self) -> dict:
        """The method's extra results.json fields (``Method.report``; e.g. a black-box method's query totals)."""
        return dict(self.method.report(self) or {})

    def weights_report(self) -> dict:
        """Every weighted key's relative weight (1/w^2, mean 1), per kind of update (for results.json)."""
        return {where: w.relative() for where, w in self.weighting.items() if not isinstance(w, Uniform) and w.w}

    # --- replay: MAML-family meta-batches on the method's tasks (the bank by default) ------------

    def replay(self, round_idx: int, batches: int) -> dict:
        """``batches`` meta-updates, each the mean meta-gradient of ``meta_batch`` replay tasks (weighted
        by the task weighting, mean 1, when one is configured)."""
        weighting = self._weighting("replay", round_idx)
        uniform = isinstance(weighting, Uniform)
        losses, accs = [], []
        t0 = time.perf_counter()
        for _ in range(batches):
            grads, keys, batch_losses = [], [], []
            for _ in range(self.cfg.learner.meta_batch):
                sampled = self._sample_task()
                if sampled is None:
                    break
                task, classes = sampled
                g, stats = self.learner.meta_grads(self.params, task)
                grads.append(g)
                keys.append(self._class_keys(classes))
                batch_losses.append(stats["loss"])
                losses.append(stats["loss"]); accs.append(stats["acc"])
            n = len(grads)
            if n == 0:
                break
            lam = None if uniform else weighting.weights(keys)
            total: dict[str, torch.Tensor] = {}
            for i, g in enumerate(grads):
                for k, v in g.items():
                    v = v.detach() if lam is None else v.detach() * float(lam[i])
                    total[k] = total.get(k, 0) + v
            self._step({k: v / n for k, v in total.items()})
            if not uniform:
                weighting.step(keys, batch_losses, self.weight_rng)
        self.method.after_replay(self, round_idx, accs)
        out = {"replay/loss": float(np.mean(losses)) if losses else float("nan"),
               "replay/acc": float(np.mean(accs)) if accs else float("nan"),
               "time/replay_s": time.perf_counter() - t0}
        if self.real is None:
            out.update({"bank/images": len(self.bank), "bank/classes": len(self.bank.classes),
                        "bank/disputed": self.bank.disputed_share()})
        if not uniform:
            out.update(weighting.summary("replay"))
        return out

    # --- meta-validation / model selection ----------------------------------------------------

    def validate(self, round_idx: int, tasks: int | None = None) -> dict:
        from ..evaluation import evaluate

        t0 = time.perf_counter()
        tr = self.cfg.train
        params = {n: p.detach() for n, p in self.params.items()}
        per_domain = {d: evaluate(self.learner, params, split, way=tr.way, shot=self.cfg.learner.train_shot,
                                  query=tr.query, tasks=tasks or tr.val_tasks, seed=self.cfg.seed + 1,
                                  device=self.device)
                      for d, split in self.val_splits.items()}
        # md: the mean over domains selects the model (each domain's own meta_val split).
        acc = float(np.mean([r.accuracy for r in per_domain.values()]))
        ci = float(np.sqrt(sum(r.ci95 ** 2 for r in per_domain.values())) / len(per_domain))
        if acc > self.best_val:
            self.best_val, self.best_round = acc, round_idx
            self.best_params = {n: p.detach().clone() for n, p in self.params.items()}
        out = {"val/acc": acc, "val/ci95": ci, "val/best": self.best_val, "time/val_s": time.perf_counter() - t0}
        if len(per_domain) > 1:
            out.update({f"val/acc/{d}": r.accuracy for d, r in per_domain.items()})
        return out

    # --- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"params": self.export_params(best=False), "best_params": self.export_params(best=True),
                 "opt": copy.deepcopy(self.opt.state_dict()), "bank": self.bank.state_dict(),
                 "rng": self.rng.bit_generator.state, "aug_gen": self.aug_gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "meta_updates": self.meta_updates,
                 "best_val": self.best_val, "best_round": self.best_round}
        if self.kd_opt is not self.opt:
            state["kd_opt"] = copy.deepcopy(self.kd_opt.state_dict())
        method_state, rule_state = self.method.state_dict(), self.rule.state_dict()
        if method_state is not None:
            state["method"] = method_state
        if rule_state is not None:
            state["rule"] = rule_state
        weighting = {where: w.state_dict() for where, w in self.weighting.items() if not isinstance(w, Uniform)}
        if weighting:
            state["weighting"] = weighting
            state["weight_rng"] = self.weight_rng.bit_generator.state
        if self.real is not None:
            state["real"] = self.real.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n].to(p.device))
        self.best_params = {n: v.to(self.device) for n, v in state["best_params"].items()}
        self.opt.load_state_dict(state["opt"])
        if self.kd_opt is not self.opt and "kd_opt" in state:
            self.kd_opt.load_state_dict(state["kd_opt"])
        for opt in {id(self.opt): self.opt, id(self.kd_opt): self.kd_opt}.values():
            for group in opt.param_groups:    # the config's lr (a PBT-mutated trial restores another's state)
                group["lr"] = self.cfg.learner.outer_lr
        self.bank.load_state_dict(state["bank"])
        self.rng.bit_generator.state = state["rng"]
        self.aug_gen.set_state(state["aug_gen"])
        torch.set_rng_state(state["torch_rng"])
        self.meta_updates = int(state["meta_updates"])
        self.best_val, self.best_round = float(state["best_val"]), int(state["best_round"])
        if "method" in state:
            self.method.load_state_dict(state["method"])
        if "rule" in state:
            self.rule.load_state_dict(state["rule"])
        for where, w_state in state.get("weighting", {}).items():
            self.weighting[where].load_state_dict(w_state)
        if "weight_rng" in state:
            self.weight_rng.bit_generator.state = state["weight_rng"]
        if self.real is not None and "real" in state:
            self.real.load_state_dict(state["real"])
