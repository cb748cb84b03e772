"""The trained meta-model as an artifact a researcher can take away.

Every run directory holds the meta-model selected on meta-val on its own:

- ``model.pt``: its parameters, a plain ``{name: tensor}`` state dict (weights only, CPU);
- ``model.json``: what is needed to use it: the backbone (architecture, width, pooling), the way it
  was trained for, the image size it works at, the per-dataset normalisation, and the learner's
  test-time adaptation (ProtoNet's prototypes, or MAML/ANIL's inner steps and learning rate).

Use it without the engine's training code (no Ray, no config, no teachers)::

    import raydfml
    model = raydfml.load_meta_model("runs/ma-free-quick-s0")
    learner = model.adapt(support_images, support_labels)   # images: [N, 3, H, W] in [0, 1] (or uint8)
    predicted = learner.predict(query_images)               # class indices in 0..way-1
    logits = learner.logits(query_images)

Images are resized to the model's size and normalised with the statistics of the dataset it was
trained on (``dataset=`` picks one when a run spans several domains).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from .errors import UserError
from .utils import atomic_path

MODEL_FILE = "model.pt"
SPEC_FILE = "model.json"
FORMAT = 1


def save_meta_model(run_dir: str | Path, params: Mapping[str, torch.Tensor], cfg) -> Path:
    """Write ``model.pt`` and ``model.json`` for ``params`` trained under ``cfg`` (both atomically)."""
    from .data.registry import get_spec
    from .runtime.parts import image_size
    from .runtime.pool import pool_datasets

    run_dir = Path(run_dir)
    lc = cfg.learner
    spec = {
        "format": FORMAT,
        "backbone": {"arch": lc.arch, "width": lc.width, "adaptive_pool": lc.adaptive_pool},
        "way": cfg.train.way,
        "image_size": image_size(cfg),
        "normalization": {d: {"mean": list(get_spec(d).mean), "std": list(get_spec(d).std)}
                          for d in pool_datasets(cfg)},
        "learner": {"name": lc.name, "inner_lr": lc.inner_lr, "test_inner_steps": lc.test_inner_steps,
                    "joint_bn": lc.joint_bn, "metric": lc.metric, "metric_scale": lc.metric_scale},
        "trained_by": {"scenario": cfg.scenario, "method": cfg.method, "profile": cfg.profile, "seed": cfg.seed},
    }
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        torch.save({n: p.detach().cpu().clone() for n, p in params.items()}, tmp)
    with atomic_path(run_dir / SPEC_FILE) as tmp:
        Path(tmp).write_text(json.dumps(spec, indent=2) + "\n")
    return run_dir / MODEL_FILE


@dataclass
class AdaptedLearner:
    """The meta-model adapted to one support set."""
    _meta: "MetaModel"
    _params: dict
    _support: tuple

    def logits(self, query_x: torch.Tensor) -> torch.Tensor:
        x = self._meta._prepare(query_x)
        x_s, y_s = self._support
        learner = self._meta._learner
        with torch.enable_grad():          # MAML's test-time inner loop differentiates the support loss
            return learner.predict(self._params, x_s, y_s, x)

    def predict(self, query_x: torch.Tensor) -> torch.Tensor:
        """Class indices (0..way-1, the labels the support used) of the query images."""
        return self.logits(query_x).argmax(dim=1)


class MetaModel:
    """A run's selected meta-model with its few-shot ``adapt``; see the module docstring."""

    def __init__(self, spec: dict, params: dict, dataset: str | None = None, device: str = "cpu"):
        from .learners import build_learner
        from .models import build_model

        self.spec = spec
        self.device = torch.device(device)
        b = spec["backbone"]
        self.way = int(spec["way"])
        self.image_size = int(spec["image_size"])
        norms = spec["normalization"]
        if dataset is None:
            dataset = next(iter(norms))
        if dataset not in norms:
            raise UserError(f"load_meta_model: dataset {dataset!r} is not one this model was trained on "
                            f"({', '.join(norms)})")
        self.dataset = dataset
        self._mean = torch.tensor(norms[dataset]["mean"], device=self.device)[:, None, None]
        self._std = torch.tensor(norms[dataset]["std"], device=self.device)[:, None, None]
        self.model = build_model(b["arch"], num_classes=self.way, image_size=self.image_size, width=b["width"],
                                 track_bn_stats=False, adaptive_pool=b["adaptive_pool"]).to(self.device)
        missing = set(dict(self.model.named_parameters())) ^ set(params)
        if missing:
            raise UserError(f"load_meta_model: model.pt does not match model.json's {b['arch']} "
                            f"(parameters differ: {', '.join(sorted(missing)[:3])})")
        lc = spec["learner"]
        self._learner = build_learner(lc["name"], self.model, inner_lr=lc["inner_lr"],
                                      test_inner_steps=lc["test_inner_steps"], joint_bn=lc.get("joint_bn", False),
                                      metric=lc.get("metric", "euclidean"),
                                      metric_scale=lc.get("metric_scale", 10.0))
        self.params = {n: v.to(self.device) for n, v in params.items()}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"images must be a [N, C, H, W] batch with 1 or 3 channels, got {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return ((x.to(self.device) - self._mean) / self._std)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> AdaptedLearner:
        """Adapt to a labelled support set (labels 0..way-1, every class at least once)."""
        y = torch.as_tensor(support_y, dtype=torch.long, device=self.device)
        if y.dim() != 1 or len(y) != len(support_x):
            raise UserError(f"support labels must be one per support image, got {tuple(y.shape)} for "
                            f"{len(support_x)} images")
        if y.min() < 0 or y.max() >= self.way or len(torch.unique(y)) != self.way:
            raise UserError(f"support labels must cover 0..{self.way - 1} (this model is {self.way}-way), "
                            f"got {sorted(torch.unique(y).tolist())}")
        return AdaptedLearner(self, self.params, (self._prepare(support_x), y))


def load_meta_model(run_dir: str | Path, dataset: str | None = None, device: str = "cpu") -> MetaModel:
    """The meta-model of a finished (or checkpointed) run directory: ``model.pt`` + ``model.json``."""
    run_dir = Path(run_dir)
    spec_path, model_path = run_dir / SPEC_FILE, run_dir / MODEL_FILE
    for p in (spec_path, model_path):
        if not p.is_file():
            raise UserError(f"load_meta_model: {p} does not exist (runs write it once training ends)")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"load_meta_model: {spec_path} is not valid JSON ({e.msg})") from None
    if spec.get("format") != FORMAT:
        raise UserError(f"load_meta_model: {spec_path} has format {spec.get('format')!r}, this version reads {FORMAT}")
    try:
        params = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:                           # a torn or foreign file: one line, not a traceback
        raise UserError(f"load_meta_model: {model_path} is not a weights file ({type(e).__name__})") from None
    if not isinstance(params, dict) or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise UserError(f"load_meta_model: {model_path} does not hold a state dict")
    return MetaModel(spec, params, dataset=dataset, device=device)


__all__ = ["AdaptedLearner", "MetaModel", "load_meta_model", "save_meta_model"]
