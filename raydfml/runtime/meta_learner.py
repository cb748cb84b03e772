"""MetaLearner: owns the meta-model, its optimiser, the task memory bank and meta-validation.

One instance per experiment, in-process or as a Ray actor. It aggregates the per-teacher gradients
that TeacherPool actors computed at the broadcast state, replays tasks from the bank, and keeps the
parameters that scored best on meta-val (model selection never looks at meta-test).
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from ..aggregation import aggregate
from ..config import ExperimentConfig
from ..data.augment import augment
from ..data.registry import get_spec
from .bank import TaskMemoryBank
from .parts import build_learner_for, build_meta_model, image_size, meta_split, task_seed
from .pool import class_dataset, pool_datasets


class MetaLearner:
    def __init__(self, cfg: dict, pool_classes: list[int], device: str | None = None, load_val: bool = True):
        from .cluster import worker_device

        self.cfg = ExperimentConfig.from_dict(cfg)
        self.device = torch.device(device) if device else worker_device(self.cfg.runtime.device,
                                                                         threads=self.cfg.runtime.meta_threads)
        torch.manual_seed(task_seed(self.cfg.seed, 1))
        self.model = build_meta_model(self.cfg).to(self.device)
        self.learner = build_learner_for(self.cfg, self.model)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.params = {n: p.detach().clone().requires_grad_(True) for n, p in self.model.named_parameters()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=self.cfg.learner.outer_lr)
        self.bank = TaskMemoryBank(self.cfg.train.bank_per_class)
        self.rng = np.random.default_rng([self.cfg.seed, 23])
        self.aug_gen = torch.Generator().manual_seed(task_seed(self.cfg.seed, 29))
        self.meta_updates = 0
        self.best_val = -1.0
        self.best_round = -1
        self.best_params = {n: p.detach().clone() for n, p in self.params.items()}
        self.purer = None
        self._adv_next, self._round = False, -1       # PURER's curriculum: harden the next round?
        if self.cfg.synth.name == "purer":
            self.purer = self._build_purer(sorted(set(pool_classes)))
        self.meta_gen = None                      # FREE's meta-generator (weights + persistent meta-Adam)
        if self.cfg.synth.name == "free":
            from ..synthesis.free import MetaGenerator

            sc = self.cfg.synth
            self.meta_gen = MetaGenerator(nz=sc.nz, ngf=sc.ngf, image_size=image_size(self.cfg), lr=sc.meta_lr,
                                          seed=task_seed(self.cfg.seed, 37), device=self.device)
        self.val_splits = {}                      # domain -> meta_val split (one entry outside md)
        if load_val:
            self.val_splits = {d: meta_split(self.cfg, d, "meta_val") for d in pool_datasets(self.cfg)}

    # --- helpers -----------------------------------------------------------------------------

    def ping(self) -> bool:
        return True

    def _normalize(self, x01: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
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

    def _step(self, grads: dict[str, torch.Tensor]) -> None:
        self.opt.zero_grad(set_to_none=True)
        for n, p in self.params.items():
            g = grads.get(n)
            p.grad = None if g is None else g.detach().to(p.device)
        self._last_grad = {n: g.detach() for n, g in grads.items()}
        self.opt.step()
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

    # --- distillation gradients from the TeacherPool ------------------------------------------

    def apply_teacher_grads(self, grads: list[np.ndarray], rule: str = "mean") -> dict:
        from ..learners import unflatten

        flat = aggregate(rule, [torch.from_numpy(np.asarray(g)) for g in grads])
        self._step(unflatten(flat.to(self.device), self.params))
        return {"kd/grad_norm": float(flat.norm())}

    def add_recovered(self, items: list[dict]) -> None:
        for it in items:
            self.bank.add(torch.from_numpy(np.asarray(it["images"])), torch.from_numpy(np.asarray(it["labels"])),
                          tuple(it["classes"]))

    # --- FREE: meta-generator update and implicit gradient alignment ---------------------------

    def generator_state(self) -> np.ndarray:
        """The meta-generator's parameters as one flat float32 vector (broadcast once per round)."""
        return torch.cat([p.detach().flatten() for p in self.meta_gen.generator.parameters()]).cpu().numpy()

    def free_step(self, items: list[dict], warmup: bool) -> dict:
        """One FREE round on the MetaLearner's side.

        The meta-generator takes one persistent-Adam step on the mean of the teachers' first-order
        meta-gradients. After warm-up, every teacher's recovered task enters the bank (FREE kept only
        the last one: bug B1) and the meta-model takes one step on FREE's alignment gradient:
        sequential distillation over the round's teachers on a copy, ``scale * (θ - θ_copy)``.
        """
        from ..aggregation.free import reptile_alignment
        from ..learners import unflatten
        from .teacher_pool import task_from_numpy

        like = dict(self.meta_gen.generator.named_parameters())
        stats = self.meta_gen.update([unflatten(torch.from_numpy(np.asarray(it["state_grad"])), like)
                                      for it in items])
        out = {"free/gen_grad_norm": stats["grad_norm"], "free/warmup": float(warmup)}
        if warmup:
            return out
        self.add_recovered(items)
        tasks = [task_from_numpy(it["task"], self.device) for it in items]
        grads, st = reptile_alignment(self.learner, self.params, tasks, lr=self.cfg.learner.outer_lr,
                                      scale=self.cfg.aggregate.free_scale)
        self._step(grads)
        out.update({"kd/loss": st["loss"], "kd/grad_norm": float(torch.cat([g.flatten() for g in grads.values()]).norm())})
        return out

    # --- TGR: implicit gradient regularisation inside a group ----------------------------------

    def tgr_displaced(self, grads: list[np.ndarray]) -> tuple[list[np.ndarray], dict]:
        """Phase 1 -> 2 of first-order IGR: each teacher's displaced state θ - η(ḡ - g_i), flat."""
        from ..aggregation.tgr import gradient_spread, igr_first_order

        flat = [torch.from_numpy(np.asarray(g)) for g in grads]
        g_bar, offsets = igr_first_order(flat, self.cfg.aggregate.tgr_eta)
        theta = torch.from_numpy(self.flat_params())
        return [(theta + off).numpy() for off in offsets], {"tgr/spread": gradient_spread(flat, g_bar)}

    def tgr_exact_step(self, items: list[dict]) -> dict:
        """Exact (second-order) IGR over the group's tasks, all in this process, then one step."""
        from ..aggregation.tgr import igr_exact, task_losses
        from .teacher_pool import task_from_numpy

        tasks = [task_from_numpy(it["task"], self.device) for it in items]
        grads, st = igr_exact(task_losses(self.learner, tasks), self.params, self.cfg.aggregate.tgr_eta)
        self._step(grads)
        return {"kd/loss": st["loss"], "tgr/spread": st["spread"],
                "kd/grad_norm": float(torch.cat([g.flatten() for g in grads.values()]).norm())}

    # --- replay: MAML-family meta-batches on tasks from the bank -------------------------------

    def _sample_task(self):
        from ..learners import Task

        lc, t = self.cfg.learner, self.cfg.train
        if self.purer is not None:
            sampled = self.purer.sample_task(t.way, lc.train_shot, lc.train_query, self.aug_gen)
        else:
            sampled = self.bank.sample_task(t.way, lc.train_shot, lc.train_query, self.rng)
        if sampled is None:
            return None
        x_s, y_s, x_q, y_q = (v.detach() if torch.is_tensor(v) else v for v in sampled[:4])
        classes = sampled[4]
        x_s = self._normalize(augment(x_s.float(), t.augment, self.aug_gen).to(self.device), y_s, classes)
        x_q = self._normalize(augment(x_q.float(), t.augment, self.aug_gen).to(self.device), y_q, classes)
        return Task(x_s, y_s.to(self.device), x_q, y_q.to(self.device))

    def replay(self, batches: int) -> dict:
        """``batches`` meta-updates, each the mean meta-gradient of ``meta_batch`` bank tasks."""
        losses, accs = [], []
        t0 = time.perf_counter()
        for _ in range(batches):
            total: dict[str, torch.Tensor] = {}
            n = 0
            for _ in range(self.cfg.learner.meta_batch):
                task = self._sample_task()
                if task is None:
                    break
                g, stats = self.learner.meta_grads(self.params, task)
                for k, v in g.items():
                    total[k] = total.get(k, 0) + v.detach()
                losses.append(stats["loss"]); accs.append(stats["acc"])
                n += 1
            if n == 0:
                break
            self._step({k: v / n for k, v in total.items()})
        if self.purer is not None and accs:
            # The curriculum watches the pseudo-task training accuracy (the seeds' switch rule).
            self._adv_next = self.purer.curriculum(self._round, float(np.mean(accs)))
        return {"replay/loss": float(np.mean(losses)) if losses else float("nan"),
                "replay/acc": float(np.mean(accs)) if accs else float("nan"),
                "time/replay_s": time.perf_counter() - t0, "bank/images": len(self.bank),
                "bank/classes": len(self.bank.classes)}

    # --- PURER's shared synthetic dataset -----------------------------------------------------

    def purer_rows(self, teacher_classes: dict[int, tuple[int, ...]]) -> dict[int, np.ndarray]:
        """The current images of each teacher's classes (what its TeacherPool actor inverts against)."""
        return {t: self.purer.rows_for(c).numpy() for t, c in teacher_classes.items()}

    def purer_step(self, round_idx: int, grads: dict[int, dict]) -> dict:
        """One Adam step of the synthetic dataset from the teachers' row gradients, plus the
        adversarial hardening term when the episode curriculum switched it on."""
        pairs = [(g["classes"], torch.from_numpy(np.asarray(g["grad"]))) for g in grads.values()]
        adversarial = self._adv_next
        stats = self.purer.step(pairs, self._adversarial_loss if adversarial else None)
        self._adv_next, self._round = False, round_idx
        out = {"synth/inv_loss": float(np.mean([g["loss"] for g in grads.values()])),
               "synth/teacher_acc": float(np.mean([g["acc"] for g in grads.values()])),
               "purer/adversarial": float(adversarial), "purer/grad_norm": stats["grad_norm"]}
        if stats["adv_loss"] is not None:
            out["purer/adv_loss"] = stats["adv_loss"]
        return out

    def _adversarial_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Minus the meta-model's outer query loss on a task drawn from the (non-detached) images:
        maximising it makes the synthetic tasks harder for the current meta-model (PURER's ECI)."""
        import torch.nn.functional as F

        lc, t = self.cfg.learner, self.cfg.train
        x_s, y_s, x_q, y_q, classes = self.purer.sample_task(t.way, lc.train_shot, lc.train_query, self.aug_gen,
                                                             images=images)
        x_s = self._normalize(augment(x_s, t.augment, self.aug_gen), y_s, classes)
        x_q = self._normalize(augment(x_q, t.augment, self.aug_gen), y_q, classes)
        params = {n: p.detach() for n, p in self.params.items()}
        fast = self.learner.adapt(params, x_s, y_s, create_graph=True)
        return -F.cross_entropy(self.learner.forward(fast, x_q), y_q)

    def _build_purer(self, classes: list[int]):
        """One learnable set of rows per global class the pool's teachers know."""
        from ..synthesis.purer import PurerDataset

        sc = self.cfg.synth
        return PurerDataset(classes=classes, per_class=sc.per_class, image_size=image_size(self.cfg),
                            lr=sc.purer_lr, bn_weight=0.01, adv_start=sc.adv_start, patience=sc.patience,
                            adv_scale=sc.adv_scale, seed=self.cfg.seed)

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
        if self.purer is not None:
            state["purer"] = self.purer.state_dict()
            state["purer_adv_next"] = self._adv_next
        if self.meta_gen is not None:
            state["meta_gen"] = self.meta_gen.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n].to(p.device))
        self.best_params = {n: v.to(self.device) for n, v in state["best_params"].items()}
        self.opt.load_state_dict(state["opt"])
        self.bank.load_state_dict(state["bank"])
        self.rng.bit_generator.state = state["rng"]
        self.aug_gen.set_state(state["aug_gen"])
        torch.set_rng_state(state["torch_rng"])
        self.meta_updates = int(state["meta_updates"])
        self.best_val, self.best_round = float(state["best_val"]), int(state["best_round"])
        if self.purer is not None and "purer" in state:
            self.purer.load_state_dict(state["purer"])
            self._adv_next = bool(state["purer_adv_next"])
        if self.meta_gen is not None and "meta_gen" in state:
            self.meta_gen.load_state_dict(state["meta_gen"])
