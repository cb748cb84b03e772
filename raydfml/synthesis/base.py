"""What every synthesizer shares: the ``Recovered`` result, the BN-statistics prior and small helpers.

A synthesizer turns a teacher (and, for the stateful ones, a piece of central state) into labelled
images. Results cross Ray's object store, so ``Recovered.images`` is float16 on the CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn


@dataclass
class Recovered:
    images: Tensor                 # float16, CPU, [n, 3, S, S], in [0, 1] pixel space
    labels: Tensor                 # int64, relative 0..way-1
    classes: tuple[int, ...]       # the teacher's global class ids; label j <-> classes[j]
    teacher_acc: float             # teacher accuracy on its own recovered images (no augmentation)
    loss: float                    # final inversion loss (of the kept iterate)
    passes: int                    # teacher forward+backward passes spent (recovery-cost benchmarks)
    seconds: float
    # Gradient for a central synthesizer state (FREE meta-generator, PURER rows); None when stateless.
    state_grad: dict[str, Tensor] | None = None


class BNStatsLoss:
    """DeepInversion's BN-statistics prior, as a context manager over a teacher's BN layers.

    While active, a forward hook on every ``BatchNorm2d`` records, for the layer's *input*,
    ``||running_var - batch_var||_2 + ||running_mean - batch_mean||_2`` (biased batch variance, as
    the seeds). ``loss()`` is the sum over layers for the last forward pass. The hooks are removed on
    exit, also on error (TGR overwrote its hook list and leaked hooks on every teacher: bug B8).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list = []
        self._terms: dict[int, Tensor] = {}

    def _hook(self, module: nn.BatchNorm2d, inputs, _output) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self._terms[id(module)] = (torch.linalg.vector_norm(module.running_var - var)
                                   + torch.linalg.vector_norm(module.running_mean - mean))

    def __enter__(self) -> "BNStatsLoss":
        for m in self.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.running_mean is None or m.running_var is None:
                    raise ValueError("BNStatsLoss needs BatchNorm2d layers with running statistics "
                                     "(a teacher built with track_bn_stats=True)")
                self._handles.append(m.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._terms.clear()

    def loss(self) -> Tensor:
        if not self._terms:
            raise RuntimeError("BNStatsLoss.loss() before any forward pass through the hooked model")
        return torch.stack(list(self._terms.values())).sum()


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for an empty module."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def make_normalizer(mean: Sequence[float], std: Sequence[float], device) -> Callable[[Tensor], Tensor]:
    """``x -> (x - mean) / std`` for [0, 1] images ``[..., 3, S, S]`` (the dataset's statistics)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return lambda x: (x - m) / s


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the duration; the caller's settings come back after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


def relative_targets(teacher_classes: Sequence[int], row_classes: Sequence[int] | Tensor) -> Tensor:
    """Each row's global class -> its position in the teacher's head (``teacher_classes[j]`` is output j).

    Mapping by global class is what PURER-Plus got wrong (it paired ascending-class rows with the
    teacher's unsorted class list: bug §7.3).
    """
    pos = {int(c): j for j, c in enumerate(teacher_classes)}
    rows = [int(c) for c in (row_classes.tolist() if isinstance(row_classes, Tensor) else row_classes)]
    missing = sorted(set(rows) - pos.keys())
    if missing:
        raise ValueError(f"rows of classes {missing} are not among the teacher's classes {tuple(teacher_classes)}")
    return torch.tensor([pos[c] for c in rows], dtype=torch.int64)


def total_variation(x: Tensor) -> Tensor:
    """The seeds' TV prior: plain (unsquared) Frobenius norms of the horizontal, vertical and both
    diagonal neighbour differences over the whole batch (DeepInversion's ``get_image_prior_losses``)."""
    d1 = x[..., :, :-1] - x[..., :, 1:]
    d2 = x[..., :-1, :] - x[..., 1:, :]
    d3 = x[..., 1:, :-1] - x[..., :-1, 1:]
    d4 = x[..., :-1, :-1] - x[..., 1:, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (d1, d2, d3, d4))


def cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


__all__ = ["Recovered", "BNStatsLoss", "module_device", "make_normalizer", "frozen", "relative_targets",
           "total_variation", "cpu_generator"]
