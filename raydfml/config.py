"""Typed experiment configuration and the one place that resolves presets.

An experiment is ``scenario x method x profile`` plus explicit overrides:

- scenario: which data and teacher pool (``mr`` one dataset and architecture; ``md``/``ma`` and the
  black-box scenarios come with their issues),
- method: which parts (synthesizer, aggregation rule, learner) with their hyperparameters,
- profile: how much compute (``smoke`` for tests, ``quick`` the CPU default, ``paper`` the seeds' values).

``resolve()`` applies them in that order, then the overrides (dotted keys such as
``learner.inner_lr``). Nothing else changes what gets built: constructors take these values.
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
    seed: int = 0


@dataclass
class SynthConfig:
    name: str = "pixel"                 # pixel (DeepInversion) | generator (TGR's recovery) | purer | free
    per_class: int = 20                 # recovered images per class per teacher
    steps: int = 200                    # inversion steps per teacher visit (pixel, generator)
    lr_pixel: float = 0.25              # Adam lr of pixel-space inversion (PURER's data lr)
    lr_generator: float = 1e-3
    lr_latent: float = 1e-3
    bn_weight: float = 1.0
    ce_weight: float = 1.0
    augment: str = "crop_flip"          # augmentation applied inside the inversion loop
    nz: int = 256                       # generator latent size (the seeds' value)
    ngf: int = 64                       # generator width; its convs dominate CPU cost (~ngf^2)
    # PURER's learnable dataset and episode curriculum
    purer_lr: float = 0.25
    adv_start: int = 4000
    patience: int = 6
    adv_scale: float = 10.0
    # FREE's meta-generator: adapted to each teacher in ``adapt_steps`` (FREE: 5) steps; ``warmup``
    # rounds meta-train only the generator; ``meta_lr`` is the persistent meta-Adam's; ``adv_weight``
    # the adversarial KL term's weight after warm-up.
    adapt_steps: int = 5
    warmup: int = 20
    meta_lr: float = 1e-3
    adv_weight: float = 1.0


@dataclass
class AggregationConfig:
    """How the MetaLearner turns the round's per-teacher work into one meta-update."""
    rule: str = "mean"                  # mean | free (sequential Reptile alignment) | tgr (grouped IGR)
    free_scale: float = 67.0            # FREE: meta-gradient = scale * (theta - theta_copy)
    tgr_groups: int = 5                 # TGR: heterogeneous groups over all teachers
    tgr_eta: float = 1e-3               # TGR: displacement lr of the implicit gradient regularisation
    tgr_form: str = "first_order"       # first_order (across actors, 2 phases) | exact (second order, MetaLearner)
    tgr_regroup_every: int = 0          # re-embed and re-group every R rounds (0: groups fixed, as TGR)
    tgr_probe: str = "random"           # Fisher probe: random (seeded Conv4) | teacher (pool teacher 0's body)


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
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    temperature: float = 1.0


@dataclass
class TrainConfig:
    rounds: int = 20
    teachers_per_round: int = 4
    kd_steps: int = 1                   # meta-updates from the round's per-teacher distillation gradients
    replay_batches: int = 10            # meta-batches of bank replay per round
    bank_per_class: int = 200           # ring size per global class in the task memory bank
    augment: str = "colour"             # augmentation of bank images when the learner uses them (a named prior)
    eval_every: int = 5
    val_tasks: int = 100
    test_tasks: int = 600
    test_shots: tuple[int, ...] = (1, 5)
    way: int = 5
    query: int = 15
    baselines: tuple[str, ...] = ("random_init", "teacher_average", "with_data")
    checkpoint_every: int = 1


@dataclass
class RuntimeConfig:
    workers: int = 2                    # TeacherPool actors; 0 = everything in-process
    device: str = "auto"
    address: str | None = None          # Ray address; None starts a local instance
    actor_cpus: float | None = None     # None: the cluster's CPUs shared among the actors (<= 1 each)
    actor_gpus: float | None = None      # None: share the cluster's GPUs among the actors
    pool_strategy: str = "default"      # "spread": place TeacherPool actors on different nodes where possible
    meta_threads: int = 1               # torch threads of the MetaLearner on CPU (more oversubscribe small cores)


@dataclass
class ExperimentConfig:
    scenario: str = "mr"
    method: str = "deepinv"
    profile: str = "quick"
    seed: int = 0
    out: str | None = None              # run directory; None: runs/<scenario>-<method>-<profile>-s<seed>
    data: DataConfig = field(default_factory=DataConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    aggregate: AggregationConfig = field(default_factory=AggregationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        cfg = cls()
        apply_overrides(cfg, flatten(d))
        return cfg


# --- presets -------------------------------------------------------------------------------------

SCENARIOS: dict[str, dict[str, Any]] = {
    # one dataset, one architecture
    "mr": {"pool.archs": ("conv4",)},
    # one dataset, three architectures (the ResNets' width is the profile's pool.width: narrowed on CPU)
    "ma": {"pool.archs": ("conv4", "resnet10", "resnet18")},
    # several datasets (on the embedded default: glyph scripts with disjoint classes), one architecture;
    # the meta-model pools adaptively so it takes every domain's image size
    "md": {"pool.archs": ("conv4",), "learner.adaptive_pool": True,
           "data.domains": ("glyphs-latin", "glyphs-greek", "glyphs-cyrillic", "glyphs-armenian")},
}

# The method `launch.py --scenario S` runs when --method is not given.
DEFAULT_METHOD = {"mr": "deepinv", "ma": "free", "md": "free"}

METHODS: dict[str, dict[str, Any]] = {
    # DeepInversion per teacher (pixel space, the probe's recipe), per-teacher distillation gradients
    # averaged by the MetaLearner, then MAML replay on the task memory bank.
    "deepinv": {"synth.name": "pixel"},
    # The same with TGR's recovery: inversion through a freshly initialised generator per teacher.
    "geninv": {"synth.name": "generator"},
    # PURER: one learnable synthetic dataset inverted from all teachers with the episode curriculum.
    "purer": {"synth.name": "purer", "synth.per_class": 20, "train.kd_steps": 0},
    # FREE: a meta-generator adapted to each teacher in 5 steps, the round's tasks aligned by sequential
    # Reptile steps on a copy of the meta-model (meta-gradient = scale * (theta - theta_copy)).
    "free": {"synth.name": "free", "synth.bn_weight": 0.0, "aggregate.rule": "free"},
    # TGR: per-teacher generator recovery; teachers grouped by task dissimilarity (Fisher embeddings);
    # one group per round, its task gradients regularised toward agreement (IGR).
    "tgr": {"synth.name": "generator", "aggregate.rule": "tgr"},
}

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "pool.num_per_arch": 4, "pool.epochs": 1,
        "synth.steps": 5, "synth.per_class": 4, "synth.ngf": 8, "synth.adv_start": 2, "synth.patience": 2,
        "train.rounds": 4, "train.teachers_per_round": 2, "train.replay_batches": 2, "train.eval_every": 2,
        "train.val_tasks": 5, "train.test_tasks": 10, "train.bank_per_class": 20,
        "learner.inner_steps": 1, "learner.test_inner_steps": 2, "learner.meta_batch": 2,
        "learner.train_shot": 1, "learner.train_query": 3,
        "pool.width": 0.125, "pool.optimizer": "adam", "synth.warmup": 1, "aggregate.tgr_groups": 2,
    },
    # The CPU default: minutes on 2 cores. Pixel inversion runs 15 steps (glyph conv4 teachers reach
    # 100% on their images within ~10 at lr 0.25); the geninv method's generator is narrowed to ngf 16
    # (its convolutions are ~16x cheaper than the seeds' ngf 64).
    "quick": {
        # ProtoNet (PURER-Plus's default learner) rather than MAML: on the same recovered glyph bank,
        # 120 meta-updates took val 5-shot accuracy from 22.8 to 50.5 with ProtoNet (outer lr 3e-3),
        # to 49.6 with first-order MAML at inner/outer lr 0.1/3e-3 but in 2.3x the time, and only to
        # 26.8 with the seeds' MAML lrs 0.01/1e-3. ProtoNet's test time needs no fine-tuning, which
        # is what makes a 600-task meta-test affordable. --set learner.name=maml restores MAML.
        "learner.name": "protonet", "learner.outer_lr": 3e-3,
        "synth.ngf": 16, "synth.steps": 15, "synth.per_class": 20,
        "train.rounds": 12, "train.teachers_per_round": 2, "train.replay_batches": 8, "train.eval_every": 4,
        "train.val_tasks": 60, "train.test_tasks": 600, "learner.train_query": 10,
        "synth.adv_start": 6, "synth.patience": 6,
        # ma: ResNet teachers at an eighth of the seeds' width (conv4 is never narrowed), trained with
        # Adam (4 epochs: resnet10 0.98, resnet18 0.98 held-out; the seeds' SGD reached 0.34).
        # FREE: warm-up shortened from 20 rounds to 4, and 15 adaptation steps instead of 5: measured on
        # the ma pool, 5 steps left the teachers at 50-65% accuracy on the recovered images, the replay
        # learner at chance and meta-val at random init (16 warm-up rounds instead of 4 did not help);
        # 15 steps gave ~90% and meta-val 36.7 after 9 rounds.
        "pool.width": 0.125, "pool.optimizer": "adam", "synth.warmup": 4, "synth.adapt_steps": 15,
        "aggregate.tgr_groups": 3,
    },
    "paper": {
        "pool.num_per_arch": 100, "pool.epochs": 60,
        "synth.steps": 200, "synth.per_class": 30, "synth.adv_start": 4000,
        "train.rounds": 1200, "train.replay_batches": 16, "train.eval_every": 20, "train.val_tasks": 600,
        "train.test_tasks": 600, "learner.meta_batch": 4,
    },
}

# Scenario-specific values of a profile (applied right after the scenario's own layer).
SCENARIO_PROFILES: dict[tuple[str, str], dict[str, Any]] = {
    # Three zoos instead of one: 6 teachers per architecture keep `launch.py --scenario ma` from
    # nothing on disk within 10 minutes on 2 cores (ResNet teachers cost 2-3x a conv4 one).
    ("ma", "quick"): {"pool.num_per_arch": 6},
}

# Values for the smoke profile's tiny embedded dataset (so tests generate it in seconds).
SMOKE_DATASET = {"data.dataset": "glyphs-smoke"}
# ... and, for scenario md, two tiny single-script domains in place of the full-size ones.
SMOKE_DOMAINS = {"data.domains": ("glyphs-smoke-latin", "glyphs-smoke-greek")}


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


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    for key, value in overrides.items():
        obj: Any = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
                raise UserError(f"config key {key!r}: unknown section {p!r}")
            obj = getattr(obj, p)
        name = parts[-1]
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
            raise UserError(f"config key {key!r}: unknown option")
        setattr(obj, name, _coerce(value, getattr(obj, name), key))
    return cfg


def resolve(scenario: str = "mr", method: str | None = "deepinv", profile: str = "quick",
            overrides: dict[str, Any] | None = None, seed: int = 0) -> ExperimentConfig:
    """Build the config for ``scenario x method x profile`` and apply ``overrides`` last.

    ``method=None`` takes the scenario's default (``DEFAULT_METHOD``).
    """
    if scenario not in SCENARIOS:
        raise UserError(f"--scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
    if method is None:
        method = DEFAULT_METHOD[scenario]
    if method not in METHODS:
        raise UserError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if profile not in PROFILES:
        raise UserError(f"--profile {profile!r}: choose one of {', '.join(PROFILES)}")
    cfg = ExperimentConfig(scenario=scenario, method=method, profile=profile, seed=seed)
    layers = [PROFILES[profile], SCENARIOS[scenario], METHODS[method]]
    if profile == "smoke":
        layers.insert(1, SMOKE_DATASET)
        if scenario == "md":                # after the scenario's own domains
            layers.insert(layers.index(SCENARIOS[scenario]) + 1, SMOKE_DOMAINS)
    layers.insert(layers.index(SCENARIOS[scenario]) + 1, SCENARIO_PROFILES.get((scenario, profile), {}))
    for layer in layers:
        apply_overrides(cfg, layer)
    apply_overrides(cfg, overrides or {})
    if cfg.data.domains:
        cfg.data.dataset = cfg.data.domains[0]
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    t, lc = cfg.train, cfg.learner
    for key, val in [("train.rounds", t.rounds), ("train.teachers_per_round", t.teachers_per_round),
                     ("train.test_tasks", t.test_tasks), ("train.val_tasks", t.val_tasks),
                     ("learner.meta_batch", lc.meta_batch), ("pool.num_per_arch", cfg.pool.num_per_arch)]:
        if val < 1:
            raise UserError(f"config {key}={val}: must be at least 1")
    from .data.registry import get_spec
    from .models import ARCHS

    get_spec(cfg.data.dataset)
    for arch in (*cfg.pool.archs, lc.arch):
        if arch not in ARCHS:
            raise UserError(f"config architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    if lc.name not in ("maml", "anil", "protonet", "reptile"):
        raise UserError(f"config learner.name={lc.name!r}: choose maml, anil, protonet or reptile")
    if cfg.synth.name not in ("pixel", "generator", "purer", "free"):
        raise UserError(f"config synth.name={cfg.synth.name!r}: choose pixel, generator, purer or free")
    ag = cfg.aggregate
    if ag.rule not in ("mean", "free", "tgr"):
        raise UserError(f"config aggregate.rule={ag.rule!r}: choose mean, free or tgr")
    if ag.rule == "free" and cfg.synth.name != "free":
        raise UserError("config aggregate.rule=free needs synth.name=free (the alignment runs on FREE's recovered tasks)")
    if ag.tgr_form not in ("first_order", "exact"):
        raise UserError(f"config aggregate.tgr_form={ag.tgr_form!r}: choose first_order or exact")
    if ag.tgr_probe not in ("random", "teacher"):
        raise UserError(f"config aggregate.tgr_probe={ag.tgr_probe!r}: choose random or teacher")
    if ag.rule == "tgr" and ag.tgr_groups < 1:
        raise UserError(f"config aggregate.tgr_groups={ag.tgr_groups}: must be at least 1")
    if ag.rule in ("free", "tgr") and cfg.train.kd_steps < 1:
        raise UserError(f"config train.kd_steps=0: aggregate.rule={ag.rule} needs the per-teacher step (kd_steps >= 1)")
    if cfg.synth.name == "free" and cfg.synth.warmup < 0:
        raise UserError(f"config synth.warmup={cfg.synth.warmup}: must be 0 or more")
    if cfg.synth.name == "free" and cfg.synth.adapt_steps < 1:
        raise UserError(f"config synth.adapt_steps={cfg.synth.adapt_steps}: must be at least 1")
    for d in cfg.data.domains:
        get_spec(d)
    if cfg.runtime.workers < 0:
        raise UserError(f"--workers {cfg.runtime.workers}: must be 0 (in-process) or more")
