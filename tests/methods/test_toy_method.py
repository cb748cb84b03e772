"""A method defined in this test module alone (registered here, nothing in the runtime touched) runs
end to end in-process and on Ray, with its own option section and central state in the checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from test_every_method import check_run_dir, run_smoke

from raydfml.methods import METHODS, Method, register_method
from raydfml.records import TeacherRecord
from raydfml.utils import task_seed

pytestmark = pytest.mark.e2e


@dataclass
class NoiseConfig:
    per_class: int = 6                # noise images per class and teacher


class TeacherLabelledNoise(Method):
    """The simplest possible method: per teacher, uniform noise images with fixed labels (the teacher's
    accuracy on them is measured), banked for replay; the central state counts images seen."""
    Config = NoiseConfig

    def run_round(self, rnd):
        batch = rnd.on_teachers("noise", rnd.draw_teachers())
        rnd.bank(batch)
        rnd.metrics.update(rnd.on_meta("count", records=batch))
        return batch

    def teacher_noise(self, pool, round_idx, tid, _payload):
        gen = torch.Generator().manual_seed(task_seed(self.cfg.seed, round_idx, tid))
        way, n = len(pool.classes_of(tid)), self.options.per_class
        x = torch.rand(way * n, 3, pool.image_size, pool.image_size, generator=gen)
        y = torch.arange(way).repeat_interleave(n)
        spec = pool.spec_of(tid)
        with torch.no_grad():
            pred = pool.teacher(tid)((x - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1))
        return TeacherRecord(teacher=tid, arch=pool.arch_of(tid), classes=pool.classes_of(tid),
                             images=x.half().numpy(), labels=y.numpy(),
                             teacher_acc=float((pred.argmax(1) == y).float().mean()), inv_loss=0.0)

    def init_central(self, ml):
        self.seen = 0

    def central_count(self, ml, round_idx, records):
        self.seen += sum(len(r.images) for r in records)
        return {"toy/seen": float(self.seen)}

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = int(state["seen"])


@pytest.fixture
def toy_method():
    register_method("toy_noise")(TeacherLabelledNoise)
    yield "toy_noise"
    METHODS.unregister("toy_noise")


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.ray)], ids=["in-process", "ray"])
def test_a_method_defined_in_a_test_module_runs_end_to_end(toy_method, workers, smoke_root, tmp_path, request):
    if workers:
        request.getfixturevalue("ray_session")     # the actors get the class by value with the config
    out = tmp_path / "run"
    cfg, _ = run_smoke(toy_method, smoke_root, out, workers, **{"toy_noise.per_class": 5})
    state = check_run_dir(cfg, out)
    seen = pd.read_csv(out / "metrics.csv")["toy/seen"].tolist()
    per_round = cfg.train.teachers_per_round * cfg.pool.way * 5
    assert seen == [per_round * (r + 1) for r in range(cfg.train.rounds)]
    assert state["method"] == {"seen": seen[-1]}
    assert json.loads((out / "config.json").read_text())["toy_noise"] == {"per_class": 5}


def test_options_of_an_unknown_or_foreign_section_are_one_line_errors(toy_method, smoke_root):
    from raydfml.config import resolve
    from raydfml.errors import UserError

    with pytest.raises(UserError, match="toy_noise.nope"):
        resolve("mr", toy_method, "smoke", {"toy_noise.nope": 1})
    with pytest.raises(UserError, match="configures method free"):
        resolve("mr", toy_method, "smoke", {"free.warmup": 1})
    with pytest.raises(UserError, match="now 'free.warmup'"):
        resolve("mr", "free", "smoke", {"synth.warmup": 1})
    assert np.isfinite(resolve("mr", toy_method, "smoke").section(toy_method).per_class)
