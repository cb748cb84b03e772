"""The shared presets: scenarios, profiles and their combinations (``raydfml.config.resolve`` layers them).

Methods bring their own presets (``raydfml.methods``: each method's ``preset`` and ``profiles``); what
is here is shared by every method. Plain data, so it reads as a table of what each name means.
"""
from __future__ import annotations

from typing import Any

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

# Black-box scenarios (BiDf-MKD's API-SS, API-SH, API-MH): the teachers are prediction APIs
# (pool.black_box), so only black-box methods run; 1-shot meta-training episodes, as the original's
# scripts. No teacher_average baseline: averaging the teachers' weights needs the weights.
BLACK_BOX = {"pool.black_box": True, "learner.train_shot": 1,
             "train.baselines": ("random_init", "with_data", "with_data_pool")}
SCENARIOS.update({
    # API-SS ~ mr: one dataset, conv4 APIs
    "ss": {**SCENARIOS["mr"], **BLACK_BOX},
    # API-SH ~ ma: one dataset, conv4 / resnet10 / resnet18 APIs
    "sh": {**SCENARIOS["ma"], **BLACK_BOX},
    # API-MH ~ md's domains x ma's architectures: one zoo per (domain, architecture), global class ids
    # offset per domain, the meta-model pools adaptively
    "mh": {**SCENARIOS["md"], **SCENARIOS["ma"], **BLACK_BOX},
})

# The method `launch.py --scenario S` runs when --method is not given.
DEFAULT_METHOD = {"mr": "deepinv", "ma": "free", "md": "free", "ss": "bidf", "sh": "bidf", "mh": "bidf"}

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "pool.num_per_arch": 4, "pool.epochs": 1,
        "synth.steps": 5, "synth.per_class": 4, "synth.ngf": 8,
        "train.rounds": 4, "train.teachers_per_round": 2, "train.replay_batches": 2, "train.eval_every": 2,
        "train.val_tasks": 5, "train.test_tasks": 10, "train.bank_per_class": 20,
        "learner.inner_steps": 1, "learner.test_inner_steps": 2, "learner.meta_batch": 2,
        "learner.train_shot": 1, "learner.train_query": 3,
        "pool.width": 0.125, "pool.optimizer": "adam",
    },
    # The CPU default: minutes on 2 cores. Pixel inversion runs 15 steps (glyph conv4 teachers reach
    # 100% on their images within ~10 at lr 0.25); the geninv method's generator is narrowed to ngf 16
    # (its convolutions are ~16x cheaper than the seeds' ngf 64).
    "quick": {
        # ProtoNet (PURER-Plus's default learner) rather than MAML: on the same recovered glyph bank,
        # 120 meta-updates took val 5-shot accuracy from 22.8 to 50.5 with ProtoNet (outer lr 3e-3),
        # to 49.6 with first-order MAML at inner/outer lr 0.1/3e-3 but in 2.3x the time, and only to
        # 26.8 with the seeds' MAML lrs 0.01/1e-3. ProtoNet's test time needs no fine-tuning, which
        # is what makes a 600-task meta-test affordable. --set learner.name=maml restores MAML (with FREE
        # also --set learner.train_way=0: its quick episodes are 20-way, which only ProtoNet can train on).
        "learner.name": "protonet", "learner.outer_lr": 3e-3,
        "synth.ngf": 16, "synth.steps": 15, "synth.per_class": 20,
        "train.rounds": 12, "train.teachers_per_round": 2, "train.replay_batches": 8, "train.eval_every": 4,
        "train.val_tasks": 60, "train.test_tasks": 600, "learner.train_query": 10,
        # ma: ResNet teachers at an eighth of the seeds' width (conv4 is never narrowed), trained with
        # Adam (4 epochs: resnet10 0.98, resnet18 0.98 held-out; the seeds' SGD reached 0.34).
        "pool.width": 0.125, "pool.optimizer": "adam",
    },
    # The seeds' values; methods add their own schedules (rounds, meta-batch, curriculum: see their
    # ``profiles["paper"]``). The seeds' MAML is second order unless --approx, which no script passes.
    "paper": {
        "pool.num_per_arch": 100, "pool.epochs": 60,
        "synth.steps": 200, "synth.per_class": 30,
        "train.rounds": 1200, "train.replay_batches": 16, "train.eval_every": 20, "train.val_tasks": 600,
        "train.test_tasks": 600, "learner.meta_batch": 4, "train.teachers_per_round": 4,
        "learner.first_order": False,
    },
}

# Scenario-specific values of a profile (applied right after the scenario's own layer).
SCENARIO_PROFILES: dict[tuple[str, str], dict[str, Any]] = {
    # Three zoos instead of one: 6 teachers per architecture keep `launch.py --scenario ma` from
    # nothing on disk within 10 minutes on 2 cores (ResNet teachers cost 2-3x a conv4 one).
    ("ma", "quick"): {"pool.num_per_arch": 6},
    ("sh", "quick"): {"pool.num_per_arch": 6},
    ("mh", "quick"): {"pool.num_per_arch": 6},
}

# Values for the smoke profile's tiny embedded dataset (so tests generate it in seconds).
SMOKE_DATASET = {"data.dataset": "glyphs-smoke"}
# ... and, for the scenarios with domains (md, mh), two tiny single-script domains in place of the full-size ones.
SMOKE_DOMAINS = {"data.domains": ("glyphs-smoke-latin", "glyphs-smoke-greek")}

