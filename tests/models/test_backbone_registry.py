"""Backbones by name: a backbone defined in a user's module (here, this test module) is a choice of
learner.arch / pool.archs, runs in-process and on Ray (shipped by value), and `launch.py --plugin`
imports one from the user's package."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydfml.errors import UserError
from raydfml.models import BACKBONES, build_model, register_backbone

REPO = Path(__file__).resolve().parents[2]


class TinyNet(nn.Module):
    """The backbone contract: forward_features(x) -> [B, D], a Linear `classifier`, forward = both."""

    def __init__(self, num_classes: int, track_bn_stats: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, track_running_stats=track_bn_stats)
        self.classifier = nn.Linear(8, num_classes)

    def forward_features(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)

    def forward(self, x):
        return self.classifier(self.forward_features(x))


@pytest.fixture
def tinynet():
    register_backbone("tinynet_test")(lambda num_classes=5, track_bn_stats=True, **_: TinyNet(num_classes, track_bn_stats))
    yield "tinynet_test"
    BACKBONES.unregister("tinynet_test")


def test_builtins_are_registered_and_unknown_names_are_one_line_errors():
    assert {"conv4", "resnet10", "resnet18", "resnet50"} <= set(BACKBONES.names())
    with pytest.raises(UserError, match="architecture 'nope': choose one of conv4"):
        build_model("nope")


def test_a_registered_backbone_is_built_by_name(tinynet):
    model = build_model(tinynet, num_classes=3, track_bn_stats=False)
    assert isinstance(model, TinyNet) and model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.ray)], ids=["in-process", "ray"])
def test_a_user_backbone_trains_as_the_meta_model(tinynet, workers, smoke_root, tmp_path, request):
    import raydfml
    from raydfml.config import resolve
    from raydfml.experiment import run_experiment

    if workers:
        request.getfixturevalue("ray_session")
    cfg = resolve("mr", "deepinv", "smoke", {"data.data_root": str(smoke_root), "runtime.workers": workers,
                                             "learner.arch": tinynet, "train.baselines": "random_init"})
    cfg.out = str(tmp_path / "run")
    results = run_experiment(cfg, progress=False)
    assert results["meta_updates"] > 0
    params = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert set(params) == {n for n, _ in TinyNet(5, False).named_parameters()}
    assert json.loads((tmp_path / "run" / "model.json").read_text())["backbone"]["arch"] == tinynet
    assert raydfml.load_meta_model(tmp_path / "run").adapt(torch.rand(5, 3, 32, 32), torch.arange(5)) \
        .predict(torch.rand(4, 3, 32, 32)).shape == (4,)


@pytest.mark.e2e
def test_launch_imports_a_plugin_module(smoke_root, tmp_path):
    plugin = tmp_path / "my_models.py"
    plugin.write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from torch import nn
        from raydfml.models import register_backbone

        class PlugNet(nn.Module):
            def __init__(self, num_classes, track_bn_stats):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3, padding=1)
                self.bn = nn.BatchNorm2d(4, track_running_stats=track_bn_stats)
                self.classifier = nn.Linear(4, num_classes)
            def forward_features(self, x):
                return F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)
            def forward(self, x):
                return self.classifier(self.forward_features(x))

        @register_backbone("plugnet")
        def plugnet(num_classes=5, track_bn_stats=True, **_):
            return PlugNet(num_classes, track_bn_stats)
    '''))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    base = [sys.executable, str(REPO / "launch.py"), "--scenario", "mr", "--profile", "smoke", "--data-root",
            str(smoke_root), "--quiet", "--workers", "0", "--set", "learner.arch=plugnet",
            "--set", "train.baselines=random_init"]
    ok = subprocess.run(base + ["--plugin", "my_models", "--out", str(tmp_path / "run")], env=env,
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "model.json").read_text())["backbone"]["arch"] == "plugnet"
    missing = subprocess.run(base + ["--out", str(tmp_path / "no")], env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "architecture 'plugnet'" in missing.stderr.strip().splitlines()[-1]
    bad = subprocess.run(base + ["--plugin", "no_such_module", "--out", str(tmp_path / "bad")], env=env,
                         capture_output=True, text=True, timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "--plugin no_such_module" in lines[0]
