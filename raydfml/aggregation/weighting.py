"""Task weighting (MTM): per-key weights that scale each task's share of a meta-update.

MTM (Boiarov et al.) minimises, over the tasks ``i`` of a meta-batch with outer losses ``L_i`` and
weights ``w_i``, ``F(w; L) = mean_i [L_i / w_i^2 + ln w_i^2]``. For fixed losses the optimum is
``w_i^2 = L_i``, so the network's gradient becomes ``mean_i grad L_i / L_i``: uncertainty weighting
that **down-weights high-loss tasks** (in data-free meta-learning, often a failed inversion).

What is weighted here, and by what key (MTM's weights belong to batch *slots*, into which i.i.d.
tasks are shuffled, so in expectation every slot is the same; keys must carry information):

- the per-teacher meta-update: one item per teacher, keyed by the teacher (``t<id>``);
- replay tasks (bank or real episodes): one item per task, keyed by its classes (``c<global id>``)
  or by their domains (``d<index>``, ``weighting.key=domain``); a task's weight is the mean of its
  keys' weights and its loss counts for each of its keys.

How the weights scale the update: item ``i`` gets ``lambda_i`` proportional to ``mean_k 1/w_k^2``
over its keys, **normalised to mean 1 over the items of the update**, and the update is
``mean_i lambda_i g_i``. MTM's own loss scales the gradient by ``1/w^2`` unnormalised; with Adam
that overall scale mostly cancels, except that the per-teacher step and replay share one Adam, where
a rescaled per-teacher gradient shrinks or swells every replay step after it. Normalising keeps the
update at the scale of the unweighted one, so a rule changes only the *relative* shares.

A rule is a ``Weighting`` subclass registered by name (``@register_weighting``) and chosen with
``--set aggregate.weighting=<name>``; its options are the shared ``weighting.*`` section. Per
update, the MetaLearner calls ``weights(items)`` before the step and ``update(items, losses)`` after
it, with the pre-step losses (the seed's order: network step, then the weight update).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import UserError
from ..registry import Registry

WEIGHTINGS = Registry("task weighting")          # the built-in rules below register on import

Keys = tuple[str, ...]
TINY = 1e-12            # w^2 below this is taken as this (1/w^2 stays finite)


def register_weighting(name: str):
    """Register a ``Weighting`` subclass as ``name`` (``--set aggregate.weighting=<name>``)."""
    def add(cls):
        cls.name = name
        return WEIGHTINGS.register(name, cls)
    return add


def gain(x0: float, gamma: float, k: int, schedule: str, every: int, multiplier: float) -> float:
    """A gain at update ``k >= 1``: ``power`` x0 / k^gamma (the seed calls it 'exponential'),
    ``constant`` x0, ``step`` x0 * multiplier^(k // every)."""
    if schedule == "power":
        return x0 / k ** gamma
    if schedule == "constant":
        return x0
    return x0 * multiplier ** (k // every)


class Weighting:
    """Base: per-key state ``w`` (MTM's weights; ``1/w^2`` scales a key's tasks). Subclasses implement
    ``update``; ``weights`` and the objective are shared."""
    name = ""
    default_init: float | None = None       # None: 1/B (the seed's slot weights), B the items per update
    default_normalize_every = 0             # every N updates w <- w / ||w||_2 (0: never)

    def __init__(self, options, batch: int):
        self.options = options
        self.batch = max(1, int(batch))
        self.w: dict[str, float] = {}
        self.k = 0                             # updates made (the gains' iteration counter)
        self.active = True                     # False before weighting.start: uniform, no updates

    # --- per-key weights -----------------------------------------------------------------------
    @property
    def init(self) -> float:
        if self.options.init > 0:
            return float(self.options.init)
        return 1.0 / self.batch if self.default_init is None else self.default_init

    def _ensure(self, items: Sequence[Keys]) -> None:
        for keys in items:
            for key in keys:
                self.w.setdefault(key, self.init)

    def inv_sq(self, key: str) -> float:
        """``1/w^2`` of ``key`` (its tasks' gradient scale before normalisation)."""
        return 1.0 / max(self.w[key] ** 2, TINY)

    def weights(self, items: Sequence[Keys]) -> np.ndarray:
        """``lambda_i`` per item (mean 1): the mean of ``1/w_k^2`` over the item's keys, normalised."""
        if not self.active:
            return np.ones(len(items))
        self._ensure(items)
        raw = np.array([np.mean([self.inv_sq(k) for k in keys]) for keys in items], dtype=np.float64)
        return raw / raw.mean()

    def objective(self, w: dict[str, float], items: Sequence[Keys], losses: Sequence[float]) -> float:
        """``F(w; L) = mean_i mean_{k in keys_i} [L_i / w_k^2 + ln w_k^2]``."""
        terms = []
        for keys, loss in zip(items, losses):
            sq = [max(w[k] ** 2, TINY) for k in keys]
            terms.append(np.mean([loss / s + math.log(s) for s in sq]))
        return float(np.mean(terms))

    def step(self, items: Sequence[Keys], losses: Sequence[float], rng: np.random.Generator) -> None:
        """After the meta-update: move the weights from the pre-step ``losses``."""
        if not self.active:
            return
        self._ensure(items)
        self.k += 1
        self.update(list(items), [float(x) for x in losses], rng)
        every = self.options.normalize_every
        every = self.default_normalize_every if every < 0 else every
        if every > 0 and self.k % every == 0 and self.w:
            norm = math.sqrt(sum(v * v for v in self.w.values())) or 1.0
            self.w = {k: v / norm for k, v in self.w.items()}

    def update(self, items: list[Keys], losses: list[float], rng: np.random.Generator) -> None:
        raise NotImplementedError

    # --- gains (SPSA) --------------------------------------------------------------------------
    def perturbation_step(self, plus: tuple, minus: tuple, rng: np.random.Generator) -> None:
        """One SPSA step over the keys of ``plus`` and ``minus`` (each ``(items, losses)``): a Rademacher
        direction, ``w <- w - a_k * delta * [F(w + c_k delta; plus) - F(w - c_k delta; minus)] / (2 c_k)``."""
        keys = sorted({k for ks in (*minus[0], *plus[0]) for k in ks})
        delta = _rademacher(keys, rng)
        a, c = self.gains()
        diff = (self.objective(_shifted(self.w, delta, c), *plus)
                - self.objective(_shifted(self.w, delta, -c), *minus))
        for k in keys:
            self.w[k] -= a * delta[k] * diff / (2 * c)

    def gains(self) -> tuple[float, float]:
        o = self.options
        a = gain(o.alpha, o.alpha_gamma, self.k, o.schedule, o.step_every, o.step_multiplier)
        c = gain(o.beta, o.beta_gamma, self.k, o.schedule, o.step_every, o.step_multiplier)
        return a, c

    # --- logging / checkpoint ------------------------------------------------------------------
    def summary(self, prefix: str) -> dict[str, float]:
        """``weight/<prefix>/{keys,min,max,spread}`` over every key seen: the keys' ``1/w^2``
        normalised to mean 1 (``spread`` = max / min: 1 means uniform)."""
        if not self.w:
            return {}
        r = np.array([self.inv_sq(k) for k in self.w])
        r = r / r.mean()
        return {f"weight/{prefix}/keys": float(len(r)), f"weight/{prefix}/min": float(r.min()),
                f"weight/{prefix}/max": float(r.max()), f"weight/{prefix}/spread": float(r.max() / r.min())}

    def relative(self) -> dict[str, float]:
        """Every key's ``1/w^2`` normalised to mean 1 (what results.json reports)."""
        if not self.w:
            return {}
        r = {k: self.inv_sq(k) for k in self.w}
        m = float(np.mean(list(r.values())))
        return {k: round(v / m, 6) for k, v in sorted(r.items())}

    def state_dict(self) -> dict:
        return {"w": dict(self.w), "k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.w = {str(k): float(v) for k, v in state["w"].items()}
        self.k = int(state["k"])


@register_weighting("none")
class Uniform(Weighting):
    """Every task counts the same (the plain mean)."""

    def weights(self, items):
        return np.ones(len(items))

    def step(self, items, losses, rng):
        pass

    def update(self, items, losses, rng):
        pass

    def summary(self, prefix):
        return {}


def _rademacher(keys: list[str], rng: np.random.Generator) -> dict[str, float]:
    return dict(zip(keys, rng.choice([-1.0, 1.0], size=len(keys)).tolist()))


def _shifted(w: dict[str, float], delta: dict[str, float], c: float) -> dict[str, float]:
    return {k: v + c * delta.get(k, 0.0) for k, v in w.items()}


@register_weighting("spsa")
class SPSA(Weighting):
    """Simultaneous perturbation (the seed's ``spsa-delta``): one Rademacher direction over the
    update's keys, ``w <- w - a_k * delta * [F(w + c_k delta; L) - F(w - c_k delta; L)] / (2 c_k)``,
    both evaluations at the same losses. Defaults are the seed's gains (a = 0.25/k^(1/6),
    c = 15/k^(1/24)) and its L2 normalisation every 100 updates; with c far above |w| they make the
    weights respond only weakly to the losses (the spec's re-simulation: max/min 1/w^2 about 1.1)."""
    default_normalize_every = 100

    def update(self, items, losses, rng):
        if self.k == 1:                      # the seed skips k = 0 (its gains divide by k)
            return
        self.perturbation_step((items, losses), (items, losses), rng)


@register_weighting("spsa_track")
class SPSATrack(Weighting):
    """SPSA with tracking (the seed's ``spsa-track``): ``F+`` at the previous update's items and
    losses, ``F-`` at this update's, so consecutive (different) batches form the difference."""
    default_normalize_every = 100

    def __init__(self, options, batch):
        super().__init__(options, batch)
        self.previous: tuple[list[Keys], list[float]] | None = None

    def update(self, items, losses, rng):
        if self.previous is not None:
            self.perturbation_step(self.previous, (items, losses), rng)
        self.previous = (items, losses)

    def state_dict(self):
        state = super().state_dict()
        if self.previous is not None:
            state["previous"] = {"items": [list(ks) for ks in self.previous[0]], "losses": list(self.previous[1])}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        prev = state.get("previous")
        self.previous = None if prev is None else ([tuple(ks) for ks in prev["items"]], list(prev["losses"]))


@register_weighting("per_class")
class PerClass(Weighting):
    """The seed's per-class SPSA, keyed by global class (or domain): every item is perturbed on its
    own keys and **every** item's update is applied, ``w_k -= u_k / B`` (the seed drew one direction
    per image and kept only the last task's update). Teacher records are keyed by their classes too.
    Weights start at 1 and are not normalised (the seed's settings)."""
    default_init = 1.0
    keys_by_class = True

    def update(self, items, losses, rng):
        if self.k == 1:
            return
        a, c = self.gains()
        total: dict[str, float] = {}
        for keys, loss in zip(items, losses):
            own = sorted(set(keys))
            delta = _rademacher(own, rng)
            diff = (self.objective(_shifted(self.w, delta, c), [keys], [loss])
                    - self.objective(_shifted(self.w, delta, -c), [keys], [loss]))
            for k in own:
                total[k] = total.get(k, 0.0) + a * delta[k] * diff / (2 * c)
        for k, u in total.items():
            self.w[k] -= u / self.batch


@register_weighting("uncertainty")
class Uncertainty(Weighting):
    """MTM's gradient variant (uncertainty weighting, Kendall et al.), with the gradient it should
    have: ``s_k = ln w_k^2`` learned by its own Adam (``weighting.lr``, the seed's 1e-3) on
    ``F = mean_i mean_k [L_i exp(-s_k) + s_k]``, whose gradient ``dF/ds_k`` is the mean over the
    key's items of ``(1 - L_i exp(-s_k))``: ``s_k`` rises while ``L > exp(s_k)`` and settles at
    ``w_k^2 = L`` (the seed's optimiser was empty in its 'Backprop' mode, so w never moved, and
    stepped twice in its 'Inner First-Order' mode). Log space has no sign flip and no 1/w^2 blow-up."""
    default_init = 1.0
    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(self, options, batch):
        super().__init__(options, batch)
        self.adam: dict[str, list[float]] = {}      # key -> [m, v, t]

    def s(self, key: str) -> float:
        return math.log(max(self.w[key] ** 2, TINY))

    def grad(self, items: Sequence[Keys], losses: Sequence[float]) -> dict[str, float]:
        """``dF/ds_k`` of the objective above (exact, analytic)."""
        g: dict[str, float] = {}
        for keys, loss in zip(items, losses):
            for k in keys:
                g[k] = g.get(k, 0.0) + (1.0 - loss * math.exp(-self.s(k))) / len(keys)
        return {k: v / len(items) for k, v in g.items()}

    def update(self, items, losses, rng):
        b1, b2 = self.betas
        for k, g in self.grad(items, losses).items():
            m, v, t = self.adam.get(k, [0.0, 0.0, 0])
            t += 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            self.adam[k] = [m, v, t]
            s = self.s(k) - self.options.lr * (m / (1 - b1 ** t)) / (math.sqrt(v / (1 - b2 ** t)) + self.eps)
            self.w[k] = math.exp(s / 2)

    def state_dict(self):
        return {**super().state_dict(), "adam": {k: list(v) for k, v in self.adam.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.adam = {str(k): [float(v[0]), float(v[1]), int(v[2])] for k, v in state.get("adam", {}).items()}


SCHEDULES = ("power", "constant", "step")
APPLY = ("both", "teachers", "replay")
KEYS = ("class", "domain")


def check_weighting(cfg) -> None:
    """One-line errors for weighting options the run cannot use (called by ``config.validate``)."""
    name, o = cfg.aggregate.weighting, cfg.weighting
    WEIGHTINGS.get(name, option="config aggregate.weighting")
    if o.schedule not in SCHEDULES:
        raise UserError(f"config weighting.schedule={o.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if o.schedule == "step" and (o.step_every < 1 or o.step_multiplier <= 0):
        raise UserError("config weighting.schedule=step needs weighting.step_every >= 1 and weighting.step_multiplier > 0")
    if o.apply not in APPLY:
        raise UserError(f"config weighting.apply={o.apply!r}: choose one of {', '.join(APPLY)}")
    if o.key not in KEYS:
        raise UserError(f"config weighting.key={o.key!r}: choose one of {', '.join(KEYS)}")
    if o.start < 0 or o.lr <= 0 or o.init < 0:
        raise UserError("config weighting.start, weighting.init must be >= 0 and weighting.lr > 0")
    if name == "none":
        return
    real = cfg.train.source == "real"
    if o.apply == "teachers" and (real or cfg.train.kd_steps == 0):
        raise UserError(f"config weighting.apply=teachers: this run has no per-teacher meta-update "
                        f"({'train.source=real' if real else 'train.kd_steps=0'})")
    if o.apply in ("both", "teachers") and not real and cfg.train.kd_steps > 0:
        from .registry import RULES

        rule = RULES.get(cfg.aggregate.rule)
        if getattr(rule, "needs", "meta_grad") != "meta_grad" or getattr(rule, "two_pass", False):
            raise UserError(f"config aggregate.weighting={name}: weights per-teacher meta-gradients, and "
                            f"aggregate.rule={cfg.aggregate.rule} combines the teachers' tasks itself; "
                            "set weighting.apply=replay to weight the replay tasks only")


def build_weighting(cfg, where: str) -> Weighting:
    """The configured weighting for ``where`` (``teachers`` or ``replay``); uniform where it does not apply."""
    o = cfg.weighting
    applies = o.apply in ("both", where) and not (where == "teachers" and cfg.train.source == "real")
    name = cfg.aggregate.weighting if applies else "none"
    batch = cfg.train.teachers_per_round if where == "teachers" else cfg.learner.meta_batch
    return WEIGHTINGS.get(name)(o, batch)


__all__ = ["WEIGHTINGS", "Weighting", "register_weighting", "build_weighting", "check_weighting", "gain"]
