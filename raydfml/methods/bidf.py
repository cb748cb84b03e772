"""``bidf``: BiDf-MKD (Hu et al., ICML 2023), data-free meta-learning from black-box teachers.

The teachers are prediction APIs (``blackbox.BlackBoxAPI``, built on the TeacherPool actor by
``pool.api``): images in, probabilities (or logits) out, every image counted. ``black_box = True``
makes the pool refuse white-box access (``pool.teacher``, the white-box synthesizers) for this method.

One round visits ``train.teachers_per_round`` APIs. A visit, on the TeacherPool actor:

1. recovers a support set S from the API with zero-order generator inversion
   (``blackbox.ZeroOrderRecovery``, the generator settings of ``synth.*``, ``bidf.q`` directions);
2. asks the API once for its answers on the augmented S and adapts the meta-model to them in
   ``bidf.kd_inner_steps`` KD steps at ``bidf.kd_inner_lr`` (first order unless ``bidf.kd_second_order``);
   with ``learner.distill_via=learner`` a learner without an inner loop (ProtoNet) adapts by the
   prototypes of S instead (bidf's default is ``head``: measured better, see ``Bidf.preset``);
3. recovers a query set Q the same way; from round ``bidf.adv_start`` on against the adapted student
   with the boundary term (``blackbox.zeroorder.api_boundary_loss``);
4. asks the API once for its answers on the augmented Q; the gradient of the KD loss on Q at the
   adapted parameters (w.r.t. the meta-parameters) is the visit's meta-gradient (ProtoNet: the KD loss
   of its prototype logits, so the meta-gradient trains the embedding it is tested with).

S and Q go to the task memory bank (replay then works as for every method), the meta-update is the
configured aggregation rule over the visits' meta-gradients (``mean``), and each visit's query count
comes back in its record. The MetaLearner keeps per-API and run totals in its checkpointed state,
logs them per round (``queries/*``) and writes them to results.json (``queries``). Before a round the
driver checks ``bidf.max_images`` (the run) and ``bidf.max_images_per_api``: a round that would go
past either stops the run, after a checkpoint, with a one-line message (``--resume`` with a larger
budget continues); the APIs enforce the same caps on the actor.

What differs from the original, and why:
- its KD "loss" passed probabilities where log-probabilities belong and averaged over classes too,
  so it was not a KL and its gradients were tens of times too small; here ``learners.distill_loss``;
- it queried the API at every inner step on the same support images; here once (the answers do not
  change), which leaves the counts at one N per set;
- it differentiated through the inner loop (second order); here first order by default (CPU cost),
  ``bidf.kd_second_order`` restores it;
- it summed the KD task with replay tasks into one step; here the visit's meta-gradient goes through
  the aggregation rule and replay makes its own steps, as for every other method in this engine;
- the visit schedule was a plateau monitor over the training accuracy, which mixed the KD task's
  accuracy with replay's; here every round visits, so the query cost per round is fixed and known;
- the zero-order smoothing, the image selection rule and the boundary term's student evaluation are
  fixed in ``blackbox.zeroorder`` (see there).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import RunStopped, UserError
from ..records import TeacherRecord
from ..utils import task_seed
from .base import Method
from .registry import register_method

OUTPUTS = ("probs", "logits")       # a label-only API gives zero-order recovery no loss to estimate


@dataclass
class BidfConfig:
    """BiDf-MKD's options (``--set bidf.<option>=...``). The generator of the recovery is ``synth.*``
    (per_class, steps, lr_generator, lr_latent, nz, ngf, augment)."""
    api_output: str = "probs"         # what the APIs answer: probs (a deployed classifier) | logits (the original)
    api_input: str = "uint8"          # what the APIs receive: uint8 (8-bit images) | float
    q: int = 100                      # zero-order directions per image and step (the original: 100)
    chunks: int = 5                   # API calls the q perturbed copies are sent in (memory only)
    grey_levels: float = 2.0          # smoothing radius: typical per-pixel move, in 8-bit grey levels
    keep: str = "best"                # recovered images: best (lowest real loss) | last iterate
    kd_inner_steps: int = 10          # KD steps of the meta-model on the support set (the original: 10)
    kd_inner_lr: float = 0.01         # their SGD learning rate (the original: 0.01)
    kd_second_order: bool = False     # differentiate through the KD inner loop (the original did)
    kd_temperature: float = 1.0
    adv_start: int = 4000             # first round whose query set uses the boundary term
    adv_weight: float = 1.0           # its weight (the original: 1)
    max_images: int = 0               # images the whole run may send to the APIs (0: no cap)
    max_images_per_api: int = 0       # images one API may receive over the run (0: no cap)


@register_method("bidf")
class Bidf(Method):
    Config = BidfConfig
    black_box = True
    free_on_resume = ("bidf.max_images", "bidf.max_images_per_api")     # a larger budget continues the run
    # KD through the linear head after the inner KD steps (the original's), also for ProtoNet: through
    # ProtoNet's prototypes (learner.distill_via=learner) `ss` quick reached 27.9 / 38.6 against 29.9 /
    # 41.1 (5-way 1/5-shot): prototype logits are negative squared distances, far from the API's
    # log-probabilities in scale (KD loss 10.8 at round 0, against 0.8 through the head).
    preset = {"synth.name": "generator", "aggregate.rule": "mean", "train.kd_steps": 1, "learner.distill_via": "head"}
    # smoke: seconds per visit on a CPU (2 directions, 2 KD steps); the boundary term is on from round 1.
    # quick: few images, many steps. Zero-order recovery from one glyph conv4 API at a fixed cost of
    # ~16,500 images, 3 teachers: 20 images/class x 15 steps -> the API agrees with 48% of the kept
    # images (ce 3.1 -> 2.1); 10 x 30 -> 68%; 5 x 60 -> 85% (ce 0.56), and 30% less wall time.
    # Raising the generator's lr instead made it worse (1e-2: 45%, 3e-2: 30%). Whole `ss` quick runs
    # (5-way 1/5-shot; random init 20.8 / 22.6) at the same queries: 20 x 15 25.2 / 32.7, 10 x 30
    # 27.4 / 35.7, 5 x 60 29.9 / 41.1, 3 x 100 30.7 / 44.4: agreement matters more than bank size.
    # paper: the original's schedule read as rounds = API visits: at most 300 visits (60000 meta-iterations,
    # a visit at the earliest every 200), one API per visit, the boundary term from meta-iteration 4000,
    # i.e. from visit 20 at the earliest; 200 replay meta-batches of 3 tasks between visits.
    profiles = {"smoke": {"bidf.q": 2, "bidf.chunks": 1, "bidf.kd_inner_steps": 2, "bidf.adv_start": 1},
                "quick": {"bidf.q": 10, "bidf.chunks": 2, "bidf.kd_inner_steps": 5, "bidf.adv_start": 4,
                          "synth.steps": 100, "synth.per_class": 3},
                "paper": {"train.rounds": 300, "train.teachers_per_round": 1, "train.replay_batches": 200,
                          "learner.meta_batch": 3, "synth.steps": 200, "synth.per_class": 30,
                          "bidf.kd_second_order": True, "bidf.adv_start": 20}}

    @classmethod
    def validate(cls, cfg) -> None:
        from ..aggregation import build_rule
        from ..blackbox.api import INPUTS
        from ..blackbox.zeroorder import KEEP
        from ..data.registry import get_spec

        o = cfg.section("bidf")
        if o.api_output not in OUTPUTS:
            raise UserError(f"config bidf.api_output={o.api_output!r}: choose {' or '.join(OUTPUTS)} (zero-order "
                            "recovery needs a loss, which top-1 labels do not give)")
        if o.api_input not in INPUTS:
            raise UserError(f"config bidf.api_input={o.api_input!r}: choose {' or '.join(INPUTS)}")
        if o.keep not in KEEP:
            raise UserError(f"config bidf.keep={o.keep!r}: choose {' or '.join(KEEP)}")
        for key in ("q", "chunks"):
            if getattr(o, key) < 1:
                raise UserError(f"config bidf.{key}={getattr(o, key)}: must be at least 1")
        for key in ("kd_inner_steps", "adv_start", "max_images", "max_images_per_api"):
            if getattr(o, key) < 0:
                raise UserError(f"config bidf.{key}={getattr(o, key)}: must be 0 or more")
        if not (o.kd_inner_lr > 0 and o.kd_temperature > 0 and o.grey_levels > 0 and o.adv_weight >= 0):
            raise UserError("config bidf: kd_inner_lr, kd_temperature and grey_levels must be > 0, adv_weight >= 0")
        if cfg.train.kd_steps != 1:
            raise UserError("config train.kd_steps=0: method bidf needs the per-teacher step (kd_steps=1)")
        rule = build_rule(cfg)
        if rule.needs != "meta_grad" or rule.two_pass:
            raise UserError(f"config aggregate.rule={cfg.aggregate.rule}: method bidf hands the rule one "
                            "meta-gradient per API visit; use a one-pass meta_grad rule such as mean")
        if cfg.pool.way != cfg.train.way:
            raise UserError(f"config pool.way={cfg.pool.way}, train.way={cfg.train.way}: bidf distils an API's "
                            "answers into the meta-model's head, so both must be equal")
        size = cfg.data.image_size or max(get_spec(d).image_size for d in (cfg.data.domains or (cfg.data.dataset,)))
        if size % 4:
            raise UserError(f"image size {size}: bidf's generator needs a size divisible by 4 (data.image_size)")

    # --- query accounting (the same arithmetic on the driver and on the actors) -------------------
    def recovery(self, image_size: int):
        from ..blackbox import ZeroOrderRecovery

        sc, o = self.cfg.synth, self.options
        return ZeroOrderRecovery(image_size=image_size, per_class=sc.per_class, steps=sc.steps,
                                 lr_generator=sc.lr_generator, lr_latent=sc.lr_latent, q=o.q,
                                 grey_levels=o.grey_levels, chunks=o.chunks, augment=sc.augment, nz=sc.nz,
                                 ngf=sc.ngf, keep=o.keep)

    def visit_images(self, way: int) -> int:
        """Images one visit sends to its API: two recoveries, plus one query each for the answers on
        the augmented support and query sets."""
        n = way * self.cfg.synth.per_class
        per_recovery = self.cfg.synth.steps * n * (1 + self.options.q) + n
        return 2 * per_recovery + 2 * n

    # --- driver -----------------------------------------------------------------------------------
    def run_round(self, rnd):
        teachers = rnd.draw_teachers()
        totals = rnd.on_meta("query_totals")
        self.check_budget(rnd.index, teachers, totals, {t: len(rnd.entries[t].global_classes) for t in teachers})
        theta = rnd.theta()
        run_counts = {"budget": "run", "calls": totals["calls"], "images": totals["images"]}
        per_api = {t: totals["apis"].get(str(t)) for t in teachers}
        with rnd.timed("time/synthesis_s"):
            batch = rnd.on_teachers("visit", teachers, theta, run_counts, per_teacher=per_api)
        rnd.metrics.update(rnd.on_meta("count_queries", records=batch))
        rnd.bank(batch)
        rnd.aggregate(batch)
        return batch

    def check_budget(self, round_idx: int, teachers: list[int], totals: dict, ways: dict[int, int]) -> None:
        """``RunStopped`` (one line) if this round's visits would take the run or an API past its cap."""
        o = self.options
        cost = {t: self.visit_images(ways[t]) for t in teachers}
        resume = "the run is checkpointed; --resume with a larger budget continues"
        if o.max_images and totals["images"] + sum(cost.values()) > o.max_images:
            raise RunStopped(f"query budget reached before round {round_idx}: its {len(teachers)} API visit(s) need "
                             f"{sum(cost.values())} images and the run has sent {totals['images']} of "
                             f"bidf.max_images={o.max_images}; {resume}")
        for t in teachers:
            used = (totals["apis"].get(str(t)) or {}).get("images", 0)
            if o.max_images_per_api and used + cost[t] > o.max_images_per_api:
                raise RunStopped(f"query budget reached before round {round_idx}: a visit of API 'teacher {t}' needs "
                                 f"{cost[t]} images and it has received {used} of bidf.max_images_per_api="
                                 f"{o.max_images_per_api}; {resume}")

    # --- TeacherPool ------------------------------------------------------------------------------
    def teacher_visit(self, pool, round_idx: int, tid: int, counts: dict | None, theta, run_counts: dict):
        """One API visit (module docstring): the recovered sets, the meta-gradient and the query count."""
        from ..blackbox import QueryBudget
        from ..data.augment import augment
        from ..learners import flatten
        from ..synthesis.base import make_normalizer

        t0 = time.perf_counter()
        o, sc = self.options, self.cfg.synth
        budget = QueryBudget(o.max_images or None, name="run")
        budget.restore(run_counts)
        api = pool.api(tid, output=o.api_output, input=o.api_input, max_images=o.max_images_per_api or None,
                       budget=budget, counts=None if counts is None else {"calls": counts["calls"],
                                                                          "images": counts["images"]})
        before = api.counts()
        classes, device = pool.classes_of(tid), pool.device
        seed = task_seed(self.cfg.seed, round_idx, tid)
        aug_gen = torch.Generator().manual_seed(task_seed(seed, 3))
        spec = pool.spec_of(tid)
        norm = make_normalizer(spec.mean, spec.std, device)      # the meta-model's inputs, as in every task
        recovery = self.recovery(pool.image_size)

        support = recovery.synthesize(api, classes, task_seed(seed, 1), device=device)
        x_s = augment(support.images.float(), sc.augment, aug_gen).to(device)
        t_s = answers_as_logits(api.predict(x_s), api.output)             # the API's answers, asked once
        y_s = support.labels.to(device)
        learner = pool.learner
        leaves = {n: v.detach().requires_grad_(True) for n, v in pool.params(theta).items()}
        # A learner without an inner loop (ProtoNet) adapts to the support set by its prototypes: with
        # learner.distill_via=learner the KD goes through them, as other methods' teacher tasks do.
        # Otherwise (bidf's preset: head) KD steps through the linear head, as the original's MAML.
        if learner.distill_via == "learner" and not learner.adapted_names(leaves):
            fast, xs_n = leaves, norm(x_s)
            predict = lambda params, x: learner.logits(params, xs_n, y_s, x, len(classes))   # noqa: E731
        else:
            with torch.enable_grad():
                fast = kd_adapt(learner, leaves, norm(x_s), t_s, o.kd_inner_steps, o.kd_inner_lr,
                                o.kd_temperature, o.kd_second_order)
            predict = learner.forward
        adapted = {n: v.detach() for n, v in fast.items()}
        student = None
        if round_idx >= o.adv_start:
            student = lambda x01: predict(adapted, norm(x01))      # noqa: E731
        query = recovery.synthesize(api, classes, task_seed(seed, 2), device=device, student=student,
                                    boundary_weight=o.adv_weight)
        x_q = augment(query.images.float(), sc.augment, aug_gen).to(device)
        t_q = answers_as_logits(api.predict(x_q), api.output)
        grad, loss, acc = kd_meta_grad(predict, leaves, fast, norm(x_q), t_q, query.labels.to(device),
                                       o.kd_temperature, pool.names)
        after = api.counts()
        return TeacherRecord(
            teacher=tid, arch=pool.arch_of(tid), classes=tuple(classes),
            images=torch.cat([support.images, query.images]).numpy(),
            labels=torch.cat([support.labels, query.labels]).numpy(),
            predicted=torch.cat([support.predicted, query.predicted]).numpy().astype(np.int64),
            confidence=torch.cat([support.confidence, query.confidence]).numpy().astype(np.float32),
            teacher_acc=(support.teacher_acc + query.teacher_acc) / 2, inv_loss=query.loss,
            passes=support.passes + query.passes, seconds=time.perf_counter() - t0,
            grad=flatten(grad, pool.names).cpu().numpy().astype(np.float32), loss=loss, accuracy=acc,
            queries={str(tid): {"arch": pool.arch_of(tid), "calls": after["calls"] - before["calls"],
                                "images": after["images"] - before["images"]}})

    # --- MetaLearner ------------------------------------------------------------------------------
    def init_central(self, ml) -> None:
        self.queries = {"apis": {}, "calls": 0, "images": 0}   # per API (teacher index) and over the run

    def central_query_totals(self, ml, round_idx: int, records) -> dict:
        return copy.deepcopy(self.queries)

    def central_count_queries(self, ml, round_idx: int, records) -> dict:
        """Add the round's visits to the totals; the round's metrics."""
        calls = images = 0
        for r in records:
            for api, c in (r.queries or {}).items():
                mine = self.queries["apis"].setdefault(api, {"arch": c.get("arch", ""), "calls": 0, "images": 0})
                mine["calls"] += int(c["calls"])
                mine["images"] += int(c["images"])
                calls, images = calls + int(c["calls"]), images + int(c["images"])
        self.queries["calls"] += calls
        self.queries["images"] += images
        return {"queries/round_images": float(images), "queries/round_calls": float(calls),
                "queries/images": float(self.queries["images"]), "queries/calls": float(self.queries["calls"]),
                "queries/apis": float(len(self.queries["apis"]))}

    def report(self, ml) -> dict:
        q = self.queries
        return {"queries": {"apis": copy.deepcopy(q["apis"]), "total": {"calls": q["calls"], "images": q["images"]}}}

    def state_dict(self) -> dict:
        return {"queries": copy.deepcopy(self.queries)}

    def load_state_dict(self, state: dict) -> None:
        self.queries = copy.deepcopy(state["queries"])


def answers_as_logits(answers: torch.Tensor, output: str) -> torch.Tensor:
    """The API's answers as logits for the KD loss: log-probabilities from a probabilities API (equal to
    its logits up to a per-image constant, which a softmax ignores), the logits themselves otherwise."""
    return answers.float().clamp_min(1e-12).log() if output == "probs" else answers.float()


def kd_adapt(learner, params: dict, x: torch.Tensor, t_logits: torch.Tensor, steps: int, lr: float,
             temperature: float, second_order: bool) -> dict:
    """``steps`` SGD steps of KD (``learners.distill_loss``) on all of ``params``; first order unless
    ``second_order`` (then the steps stay differentiable w.r.t. ``params``)."""
    from ..learners import distill_loss

    fast = dict(params)
    names = list(fast)
    for _ in range(steps):
        loss = distill_loss(learner.forward(fast, x), t_logits, temperature)
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=second_order, allow_unused=True)
        fast = {n: fast[n] if g is None else fast[n] - lr * (g if second_order else g.detach())
                for n, g in zip(names, grads)}
    return fast


def kd_meta_grad(predict, leaves: dict, fast: dict, x: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor,
                 temperature: float, names: list[str]) -> tuple[dict, float, float]:
    """The KD loss on the query set at the adapted parameters, its gradient w.r.t. the meta-parameters
    (``leaves``; first order: equal to the gradient at the adapted ones), and the student's accuracy.
    ``predict(params, x)`` gives the student's logits (the head, or the support's prototypes)."""
    from ..learners import distill_loss

    with torch.enable_grad():
        logits = predict(fast, x)
        loss = distill_loss(logits, t_logits, temperature)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    out = {n: torch.zeros_like(leaves[n]) if g is None else g.detach() for n, g in zip(names, grads)}
    acc = float((logits.detach().argmax(1) == y).float().mean())
    return out, float(loss.detach()), acc


__all__ = ["Bidf", "BidfConfig", "answers_as_logits", "kd_adapt", "kd_meta_grad"]
