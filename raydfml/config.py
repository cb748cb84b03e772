"""Typed experiment configuration and the one place that resolves presets.

An experiment is ``scenario x method x profile`` plus explicit overrides:

- scenario: which data and teacher pool (``mr`` one dataset and architecture, ``ma`` three
  architectures, ``md`` several datasets),
- method: a registered method (``raydfml.methods``) with its preset of shared values (which
  synthesizer, which aggregation rule) and its own option section,
- profile: how much compute (``smoke`` for tests, ``quick`` the CPU default, ``paper`` the seeds' values).

``resolve()`` layers them (profile, scenario, the method's preset and its per-profile values), then
the overrides (dotted keys such as ``learner.inner_lr`` or ``free.warmup``). The shared sections are
the dataclasses below; the method's and the aggregation rule's option sections are the ``Config``
dataclasses they registered, kept in ``ExperimentConfig.sections`` under their names. Nothing else
changes what gets built: constructors take these values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


@dataclass
class DataConfig:
    dataset: str = "glyphs"
    data_root: str = "data"
    image_size: int | None = None       # None: the dataset's own size
    # Scenario md: the datasets (domains) of the pool, each with its own meta-train/val/test split and
    # one zoo per (domain, architecture). Empty: the pool is on ``dataset`` alone. When set, ``dataset``
    # is the first domain: it names the meta-model's input normalisation.
    domains: tuple[str, ...] = ()


@dataclass
class PoolConfig:
    """The teacher pool: one zoo per architecture, all on ``data.dataset``."""
    archs: tuple[str, ...] = ("conv4",)
    num_per_arch: int = 10
    way: int = 5
    policy: str = "random"
    epochs: int = 4
    width: float = 1.0                 # channel multiplier for ResNet teachers (CPU profiles narrow them)
    optimizer: str = "seeds"            # teacher training: seeds (ResNets SGD) | adam (all Adam; CPU profiles)
    zoo_dir: str | None = None          # None: <data_root>/zoo/<derived name>
    arch_plans: str = "distinct"        # distinct: each architecture's zoo gets its own class subsets | shared
    seed: int = 0
    # Black-box teachers (scenarios ss, sh, mh): the TeacherPool hands methods only prediction APIs
    # (``TeacherPool.api``), so only methods that learn through APIs (``Method.black_box``) run.
    black_box: bool = False


@dataclass
class SynthConfig:
    """The per-teacher synthesizer (``synth.name``, a name in ``raydfml.synthesis.SYNTHESIZERS``) and
    the generator settings that FREE's meta-generator shares with it."""
    name: str = "pixel"                 # pixel (DeepInversion in pixel space) | generator (TGR's recovery)
    per_class: int = 20                 # recovered images per class per teacher
    steps: int = 200                    # inversion steps per teacher visit (pixel, generator)
    lr_pixel: float = 0.25              # Adam lr of pixel-space inversion (PURER's data lr)
    lr_generator: float = 1e-3
    lr_latent: float = 1e-3
    bn_weight: float = 1.0
    ce_weight: float = 1.0
    tv_weight: float = 1e-4             # pixel inversion's total-variation prior (the generator has none)
    augment: str = "auto"               # inside inversion; auto: crop_flip, or crop where mirror images change class
    nz: int = 256                       # generator latent size (the seeds' value)
    ngf: int = 64                       # generator width; its convs dominate CPU cost (~ngf^2)


@dataclass
class AggregationConfig:
    """How the MetaLearner turns the round's per-teacher work into one meta-update: the name of a
    rule in ``raydfml.aggregation.RULES`` (its options are the section named after it, e.g. ``igr.eta``)."""
    rule: str = "mean"                  # mean | align (FREE) | igr (TGR)
    # Task weighting (MTM), a name in ``raydfml.aggregation.WEIGHTINGS``: none | spsa | spsa_track |
    # per_class | uncertainty; its options are the ``weighting`` section.
    weighting: str = "none"


@dataclass
class WeightingConfig:
    """Options of the task weighting (``aggregate.weighting``); defaults are the MTM seed's values."""
    apply: str = "both"                 # both | teachers (per-teacher meta-gradients) | replay (replay tasks)
    key: str = "class"                  # what keys a replay task: class (its global classes) | domain
    start: int = 0                      # first weighted round; before it uniform (the seed: baseline, then weighted)
    alpha: float = 0.25                 # SPSA step gain a_k = alpha / k^alpha_gamma (schedule power)
    alpha_gamma: float = 1 / 6
    beta: float = 15.0                  # SPSA perturbation c_k = beta / k^beta_gamma
    beta_gamma: float = 1 / 24
    schedule: str = "power"             # power (the seed's 'exponential': x0 / k^gamma) | constant | step
    step_every: int = 0                 # schedule step: gains times step_multiplier every step_every updates
    step_multiplier: float = 1.0
    normalize_every: int = -1           # w <- w / ||w||_2 every N updates; -1: the rule's (spsa*: 100; others never)
    init: float = 0.0                   # initial w; 0: the rule's (spsa*: 1/B as the seed; per_class, uncertainty: 1)
    lr: float = 1e-3                    # uncertainty: Adam learning rate of ln w^2


@dataclass
class LearnerConfig:
    name: str = "maml"                  # maml | anil | protonet | reptile
    arch: str = "conv4"
    width: float = 1.0
    adaptive_pool: bool = False
    first_order: bool = True
    inner_lr: float = 0.01
    inner_steps: int = 5
    test_inner_steps: int = 10
    outer_lr: float = 1e-3
    meta_batch: int = 4
    train_shot: int = 5
    train_query: int = 15
    train_way: int = 0                  # ways of a meta-training episode (replay, with-data); 0: train.way.
                                        # ProtoNet only (its head is unused; the others' head has train.way outputs)
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    temperature: float = 1.0
    distill_via: str = "learner"        # learner (ProtoNet: its prototypes) | head (the linear head, as before)
    joint_bn: bool = False              # ProtoNet: support and query share BN batch statistics
    metric: str = "euclidean"           # ProtoNet: euclidean (-squared distance) | cosine (of L2-normalised features)
    metric_scale: float = 10.0          # the cosine logits' fixed scale (a softmax temperature of 1/scale)


@dataclass
class TrainConfig:
    rounds: int = 20
    teachers_per_round: int = 4
    kd_steps: int = 1                   # 1: one meta-update per round from the teachers' contributions; 0: none
    replay_batches: int = 10            # meta-batches of bank replay per round
    bank_per_class: int = 200           # ring size per global class in the task memory bank
    bank_filter: str = "none"           # none | agree (bank only images the teacher labels as intended) | relabel
    kd_optimizer: str = "shared"        # the per-teacher meta-update's Adam moments: shared with replay (the seeds;
                                        # keep its gradient near replay's scale) | own (cannot shrink replay steps)
    augment: str = "colour"             # augmentation of bank images when the learner uses them (a named prior)
    eval_every: int = 5
    val_tasks: int = 100
    test_tasks: int = 600
    test_shots: tuple[int, ...] = (1, 5)
    way: int = 5
    query: int = 15
    baselines: tuple[str, ...] = ("random_init", "teacher_average", "with_data", "with_data_pool")
    checkpoint_every: int = 1
    # Where meta-training tasks come from: teachers (data-free: the method's recovered images) | real
    # (real meta-train episodes of the dataset, the same learner, rules and checkpoints; no teachers).
    source: str = "teachers"


@dataclass
class RuntimeConfig:
    workers: int = 2                    # TeacherPool actors; 0 = everything in-process
    device: str = "auto"
    address: str | None = None          # Ray address; None starts a local instance
    actor_cpus: float | None = None     # None: the cluster's CPUs shared among the actors (<= 1 each)
    actor_gpus: float | None = None      # None: share the cluster's GPUs among the actors
    pool_strategy: str = "default"      # "spread": place TeacherPool actors on different nodes where possible
    meta_threads: int = 1               # torch threads of the MetaLearner on CPU (more oversubscribe small cores)
    # A folder where per-teacher recoveries (deepinv, geninv, tgr) are kept and read back by runs that
    # recover the same teacher with the same synthesis options and seed (ablations over learners or
    # weightings); None: never cached. Recovery never depends on the meta-model, so results are equal.
    synth_cache: str | None = None


SHARED_SECTIONS = ("data", "pool", "synth", "learner", "train", "runtime", "aggregate", "weighting")


@dataclass
class ExperimentConfig:
    scenario: str = "mr"
    method: str = "deepinv"
    profile: str = "quick"
    seed: int = 0
    out: str | None = None              # run directory; None: runs/<scenario>-<method>-<profile>-s<seed>-<hash>
    data: DataConfig = field(default_factory=DataConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    aggregate: AggregationConfig = field(default_factory=AggregationConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    # The typed option sections of this run's method and aggregation rule, keyed by their registered
    # names (``--set free.warmup=4``, ``--set igr.eta=1e-3``); see ``section``.
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """What the run trains with: the method, or ``real`` when it meta-trains on real episodes."""
        return "real" if self.train.source == "real" else self.method

    @property
    def episode_way(self) -> int:
        """Ways of a meta-training episode: ``learner.train_way``, or the test tasks' ``train.way``."""
        return self.learner.train_way or self.train.way

    def section(self, name: str) -> Any:
        """The option section of the part called ``name`` (this run's method or rule)."""
        if name not in self.sections:
            raise KeyError(f"this config has no {name!r} section (it has {', '.join(self.sections) or 'none'})")
        return self.sections[name]

    def to_dict(self) -> dict[str, Any]:
        """Plain values; the part sections appear at the top level under their names."""
        d = dataclasses.asdict(self)
        d.pop("sections")
        d.update({name: dataclasses.asdict(sec) for name, sec in self.sections.items()})
        return d

    def for_workers(self) -> dict[str, Any]:
        """``to_dict()`` plus the parts it names that were registered outside the package (a user's own
        method), for a config that goes to a Ray worker; ``from_dict`` there registers them first."""
        from .plugins import user_parts

        d = self.to_dict()
        parts = user_parts(self)
        if parts:
            d["_parts"] = parts
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        d = dict(d)
        if "_parts" in d:
            from .plugins import install

            install(d.pop("_parts"))
        cfg = cls(method=d.get("method", cls.method))
        apply_overrides(cfg, flatten(d))
        return cfg


# --- presets (raydfml/presets.py) -----------------------------------------------------------------
from .presets import (DEFAULT_METHOD, PROFILES, SCENARIO_PROFILES, SCENARIOS, SMOKE_DATASET,  # noqa: E402
                      SMOKE_DOMAINS)

# Options that moved into a method's or a rule's own section: an old key gets a pointer, not a shrug.
MOVED_KEYS = {
    "synth.purer_lr": "purer.lr", "synth.adv_start": "purer.adv_start", "synth.patience": "purer.patience",
    "synth.adv_scale": "purer.adv_scale", "synth.adapt_steps": "free.adapt_steps", "synth.warmup": "free.warmup",
    "synth.meta_lr": "free.meta_lr", "synth.adv_weight": "free.adv_weight", "aggregate.free_scale": "align.scale",
    "aggregate.tgr_groups": "tgr.groups", "aggregate.tgr_regroup_every": "tgr.regroup_every",
    "aggregate.tgr_probe": "tgr.probe", "aggregate.tgr_eta": "igr.eta", "aggregate.tgr_form": "igr.form",
}
RENAMED_RULES = {"free": "align", "tgr": "igr"}


def method_registry():
    from .methods import METHODS

    return METHODS


def rule_registry():
    from .aggregation import RULES

    return RULES


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _coerce(value: Any, current: Any, key: str) -> Any:
    if current is None or value is None:
        return value
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(current, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            kind = type(current[0]) if current else str
            return tuple(kind(i.strip() if isinstance(i, str) else i) for i in items)
        return type(current)(value)
    except (TypeError, ValueError):
        raise UserError(f"config {key}={value!r}: expected a {type(current).__name__}") from None


def _set(obj: Any, key: str, name: str, value: Any) -> None:
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        raise UserError(f"config key {key!r}: unknown option")
    setattr(obj, name, _coerce(value, getattr(obj, name), key))


def _part_sections(cfg: ExperimentConfig) -> dict[str, Any]:
    """Fresh option sections for the config's method and rule (those that declare one)."""
    out: dict[str, Any] = {}
    for name, registry in ((cfg.method, method_registry()), (cfg.aggregate.rule, rule_registry())):
        section = getattr(registry.get(name) if name in registry else None, "Config", None)
        if section is not None:
            out[name] = cfg.sections.get(name) if isinstance(cfg.sections.get(name), section) else section()
    return out


def part_owner(name: str) -> str | None:
    """``"method"`` or ``"aggregation rule"`` when ``name`` is the option section of such a part, else None."""
    for kind, registry in (("method", method_registry()), ("aggregation rule", rule_registry())):
        if name in registry and getattr(registry.get(name), "Config", None) is not None:
            return kind
    return None


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """Set dotted keys (``learner.inner_lr``, ``free.warmup``) on ``cfg``, coercing to each field's type.

    Keys of the shared sections are applied first, in order; then the method's and the rule's option
    sections are (re)built for the resulting ``method`` and ``aggregate.rule`` and their keys applied,
    in order. So ``--set aggregate.rule=igr --set igr.eta=0.01`` works in either order.
    """
    deferred = []
    for key, value in overrides.items():
        parts = key.split(".")
        if key in MOVED_KEYS:
            raise UserError(f"config key {key!r} is now {MOVED_KEYS[key]!r} (options of a method or a rule "
                            "live in the section named after it)")
        if len(parts) == 1:
            if parts[0] in ("sections",) or parts[0] in SHARED_SECTIONS:
                raise UserError(f"config key {key!r}: a section, not an option")
            _set(cfg, key, parts[0], value)
            continue
        if parts[0] in SHARED_SECTIONS:
            obj: Any = cfg
            for p in parts[:-1]:
                if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
                    raise UserError(f"config key {key!r}: unknown section {p!r}")
                obj = getattr(obj, p)
            if key == "aggregate.rule" and value in RENAMED_RULES:
                raise UserError(f"config aggregate.rule={value!r}: the rule is now called {RENAMED_RULES[value]!r}")
            _set(obj, key, parts[-1], value)
            continue
        deferred.append((key, parts, value))
    cfg.sections = _part_sections(cfg)
    for key, parts, value in deferred:
        section = cfg.sections.get(parts[0])
        if section is None:
            owner = part_owner(parts[0])
            if owner == "method":
                raise UserError(f"config key {key!r}: section {parts[0]!r} configures method {parts[0]}, "
                                f"and this run's method is {cfg.method}")
            if owner:
                raise UserError(f"config key {key!r}: section {parts[0]!r} configures aggregation rule "
                                f"{parts[0]}, and this run's aggregate.rule is {cfg.aggregate.rule}")
            raise UserError(f"config key {key!r}: unknown section {parts[0]!r}")
        if len(parts) != 2:
            raise UserError(f"config key {key!r}: unknown option")
        _set(section, key, parts[1], value)
    return cfg


def resolve(scenario: str = "mr", method: str | None = "deepinv", profile: str = "quick",
            overrides: dict[str, Any] | None = None, seed: int = 0) -> ExperimentConfig:
    """Build the config for ``scenario x method x profile`` and apply ``overrides`` last.

    Layers, each overriding the ones before: the profile (shared values), the scenario, the
    scenario's values for this profile, the method's preset, the method's values for this profile,
    then ``overrides``. ``method=None`` takes the scenario's default (``DEFAULT_METHOD``).
    """
    if scenario not in SCENARIOS:
        raise UserError(f"--scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
    if method is None:
        method = DEFAULT_METHOD[scenario]
    impl = method_registry().get(method, option="--method")
    if profile not in PROFILES:
        raise UserError(f"--profile {profile!r}: choose one of {', '.join(PROFILES)}")
    if impl.scenarios is not None and scenario not in impl.scenarios:
        raise UserError(f"--method {method}: runs in scenario(s) {', '.join(impl.scenarios)}, not {scenario}")
    cfg = ExperimentConfig(scenario=scenario, method=method, profile=profile, seed=seed)
    layers = [PROFILES[profile], SCENARIOS[scenario]]
    if profile == "smoke":
        layers.insert(1, SMOKE_DATASET)
        if "data.domains" in SCENARIOS[scenario]:     # md, mh: after the scenario's own domains
            layers.append(SMOKE_DOMAINS)
    layers += [SCENARIO_PROFILES.get((scenario, profile), {}), dict(impl.preset),
               dict(impl.profiles.get(profile, {})), dict(overrides or {})]
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            merged.pop(key, None)           # a later layer's value also comes later in the order
            merged[key] = value
    # A method's preset may tune the options of its default rule (free: align.scale); when the user
    # picks another rule those values do not apply. The user's own options of another rule still fail.
    rule = merged.get("aggregate.rule", AggregationConfig.rule)
    mine = set(overrides or {})
    for key in [k for k in merged if k not in mine and "." in k]:
        section = key.split(".")[0]
        if section != rule and part_owner(section) == "aggregation rule":
            del merged[key]
    apply_overrides(cfg, merged)
    from .data.folder import absolute_name   # a folder dataset is named by its absolute path, for every process

    cfg.data.dataset = absolute_name(cfg.data.dataset)
    cfg.data.domains = tuple(absolute_name(d) for d in cfg.data.domains)
    if cfg.data.domains:
        cfg.data.dataset = cfg.data.domains[0]
    if cfg.synth.augment == "auto":
        cfg.synth.augment = auto_augment(cfg)
    validate(cfg)
    return cfg


def auto_augment(cfg: ExperimentConfig) -> str:
    """``synth.augment=auto``: FREE/TGR's crop + horizontal flip, without the flip when a flipped image
    of some pool dataset is another class (the glyph letters)."""
    from .data.registry import get_spec

    datasets = cfg.data.domains or (cfg.data.dataset,)
    return "crop_flip" if all(get_spec(d).mirror for d in datasets) else "crop"


def compatible(scenario: str, method: str) -> bool:
    """Whether ``method`` runs in ``scenario`` (Tune's ``{grid: all}`` skips the pairs that do not)."""
    impl = method_registry().get(method)
    if SCENARIOS[scenario].get("pool.black_box") and not impl.black_box:
        return False                        # a white-box method in a black-box scenario (ss, sh, mh)
    return impl.scenarios is None or scenario in impl.scenarios


def validate(cfg: ExperimentConfig) -> None:
    t, lc = cfg.train, cfg.learner
    for key, val in [("train.rounds", t.rounds), ("train.teachers_per_round", t.teachers_per_round),
                     ("train.test_tasks", t.test_tasks), ("train.val_tasks", t.val_tasks),
                     ("learner.meta_batch", lc.meta_batch), ("pool.num_per_arch", cfg.pool.num_per_arch)]:
        if val < 1:
            raise UserError(f"config {key}={val}: must be at least 1")
    from .data.registry import get_spec
    from .learners import LEARNERS, check_metric
    from .models import BACKBONES
    from .synthesis import SYNTHESIZERS

    from .data.folder import check_ways

    get_spec(cfg.data.dataset)
    if lc.train_way < 0 or lc.train_way == 1:
        raise UserError(f"config learner.train_way={lc.train_way}: 0 (train.way) or at least 2")
    if lc.train_way and lc.train_way != t.way and lc.name != "protonet":
        raise UserError(f"config learner.train_way={lc.train_way}: only learner.name=protonet meta-trains on more "
                        f"or fewer ways than it is tested on (learner {lc.name!r} classifies with a "
                        f"{t.way}-way head, train.way); add --set learner.train_way=0")
    check_metric(lc.name, lc.metric, lc.metric_scale)
    check_ways(cfg.data.domains or (cfg.data.dataset,), pool_way=cfg.pool.way, train_way=cfg.train.way,
               episode_way=lc.train_way or None)
    for arch in (*cfg.pool.archs, lc.arch):
        if arch not in BACKBONES:
            raise UserError(f"config architecture {arch!r}: choose one of {', '.join(BACKBONES.names())} "
                            "(or register your own with raydfml.models.register_backbone)")
    if lc.name not in LEARNERS:
        raise UserError(f"config learner.name={lc.name!r}: choose one of {', '.join(LEARNERS)}")
    SYNTHESIZERS.get(cfg.synth.name, option="config synth.name")
    rule = rule_registry().get(cfg.aggregate.rule, option="config aggregate.rule")
    for d in cfg.data.domains:
        get_spec(d)
    if cfg.runtime.workers < 0:
        raise UserError(f"--workers {cfg.runtime.workers}: must be 0 (in-process) or more")
    from .data.augment import check_augment

    if cfg.train.kd_steps not in (0, 1):
        raise UserError(f"config train.kd_steps={cfg.train.kd_steps}: 0 (no per-teacher step) or 1; more "
                        "meta-updates per round come from replay (train.replay_batches)")

    check_augment(cfg.synth.augment)
    check_augment(cfg.train.augment)
    for key in ("bn_weight", "ce_weight", "tv_weight"):
        if not getattr(cfg.synth, key) >= 0:
            raise UserError(f"config synth.{key}={getattr(cfg.synth, key)}: a loss weight must be 0 or more")
    if cfg.train.kd_optimizer not in ("shared", "own"):
        raise UserError(f"config train.kd_optimizer={cfg.train.kd_optimizer!r}: choose shared or own")
    if cfg.train.bank_filter not in ("none", "agree", "relabel"):
        raise UserError(f"config train.bank_filter={cfg.train.bank_filter!r}: choose none, agree or relabel")
    if cfg.pool.arch_plans not in ("distinct", "shared"):
        raise UserError(f"config pool.arch_plans={cfg.pool.arch_plans!r}: choose distinct or shared")
    if cfg.train.source not in ("teachers", "real"):
        raise UserError(f"config train.source={cfg.train.source!r}: choose teachers (data-free) or real")
    from .aggregation.weighting import check_weighting

    check_weighting(cfg)
    if hasattr(rule, "validate"):
        rule.validate(cfg)
    impl = method_registry().get(cfg.method, option="--method")
    if cfg.pool.black_box and "teacher_average" in cfg.train.baselines:
        raise UserError(f"config train.baselines: teacher_average averages the teachers' weights, and scenario "
                        f"{cfg.scenario}'s teachers are black-box APIs (pool.black_box); drop it")
    if cfg.pool.black_box and not impl.black_box:
        raise UserError(f"--method {cfg.method}: needs white-box teachers (weights, BN statistics or gradients), and "
                        f"scenario {cfg.scenario}'s teachers are black-box APIs (pool.black_box); use a black-box "
                        "method such as bidf")
    impl.validate(cfg)
