"""A teacher seen as a black-box API (BiDf-MKD's setting): images in, predictions out, nothing else.

``BlackBoxAPI`` wraps a teacher module privately. The only way to use it is ``predict(images)``,
which does what a deployed classifier behind an API would do with a request:

1. take the caller's [0, 1] pixel images ``[n, 3, S, S]`` (the meta-model's space) *by value*:
   they are detached, so no autograd graph reaches the teacher;
2. quantise them to what travels over the wire: 8-bit by default (``round(x * 255) / 255``), or
   float (``input="float"``) for an API that accepts raw floats;
3. apply the API's own preprocessing: resize to the resolution the teacher was trained at (when
   ``image_size`` is given) and normalise with the dataset's mean/std;
4. answer with class probabilities (``output="probs"``, default), raw logits (``"logits"``; BiDf-MKD's
   code used these) or only the top-1 label (``"label"``, int64), detached, on the caller's device.

The wrapper is not an ``nn.Module``: code written for white-box teachers (``.parameters()``,
``.state_dict()``, ``.named_modules()``, hooks, ``.eval()``, calling it like a module) fails loudly
with a message that says the teacher is a black-box API, instead of silently reading weights or BN
statistics. This is a guard against accidental white-box use in this code base, not a security
boundary (Python cannot hide the wrapped module from someone who goes looking for it).

Every query is counted (``calls``, ``images``) and can be capped per API (``max_images``) and per
run (a ``QueryBudget`` shared by several APIs). A query that would go over a cap raises
``BudgetExceeded`` *before* the teacher is run, so the counts never exceed a cap. ``counts()`` is a
plain dict (what a TeacherPool actor puts into its returned records) and ``restore(counts)`` puts
such totals back, e.g. into the APIs of an actor that replaced a dead one (the MetaLearner keeps the
totals in its checkpoint).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..models import resize
from ..synthesis.base import module_device

OUTPUTS = ("probs", "logits", "label")
INPUTS = ("uint8", "float")


class BudgetExceeded(UserError):
    """A query would take an API (or the run) past its query budget; raised before querying."""


class WhiteBoxAccessError(AttributeError):
    """White-box access (weights, modules, hooks, autograd) attempted on a black-box API.

    An ``AttributeError`` so that ``hasattr``/``getattr(..., default)`` probes, which copy and
    pickle make, still read as "no such attribute"."""


def _whitebox_message(api_name: str, what: str) -> str:
    return (f"teacher {api_name!r} is a black-box API: {what} is not available; "
            "use predict(images) (probabilities, logits or labels) and its query counters")


class QueryBudget:
    """A cap on the images sent to a group of APIs together (e.g. all teachers of one run).

    Pass the same object to several ``BlackBoxAPI``s; each of their queries is checked against it
    before it is made and charged to it after. ``max_images=None`` only counts."""

    def __init__(self, max_images: int | None = None, name: str = "run"):
        if max_images is not None and int(max_images) < 0:
            raise UserError(f"query budget {name!r}: max_images must be >= 0 or None, got {max_images}")
        self.max_images = None if max_images is None else int(max_images)
        self.name = str(name)
        self.calls = 0
        self.images = 0

    @property
    def remaining(self) -> int | None:
        return None if self.max_images is None else self.max_images - self.images

    def check(self, n: int, api_name: str, use: str = "a query") -> None:
        """Raise ``BudgetExceeded`` if ``n`` more images would go past the cap (nothing is charged)."""
        if self.max_images is not None and self.images + n > self.max_images:
            raise BudgetExceeded(
                f"{use} of {n} images to API {api_name!r} would exceed the {self.name} query budget of "
                f"{self.max_images} images ({self.images} used in {self.calls} calls so far)")

    def charge(self, n: int) -> None:
        self.calls += 1
        self.images += int(n)

    def counts(self) -> dict:
        return {"budget": self.name, "max_images": self.max_images, "calls": self.calls, "images": self.images}

    def restore(self, counts: Mapping) -> None:
        """Set the totals from a ``counts()`` dict (the cap stays the one this object was made with)."""
        if counts.get("budget", self.name) != self.name:
            raise ValueError(f"counts of budget {counts.get('budget')!r} restored into budget {self.name!r}")
        self.calls, self.images = int(counts["calls"]), int(counts["images"])

    def __repr__(self) -> str:
        return f"QueryBudget({self.name!r}, max_images={self.max_images}, calls={self.calls}, images={self.images})"


def _check_per_image(teacher: nn.Module, name: str) -> None:
    """A real API answers each image on its own. BN layers without running statistics normalise with
    the statistics of the request, so an image's answer would depend on the other images in the same
    query; zero-order estimates, which batch many perturbed copies together, would then be noise."""
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise UserError(f"API {name!r}: its teacher has BatchNorm layers without running statistics, so an "
                            "image's prediction would depend on the rest of the query; build the teacher with "
                            "track_bn_stats=True")


class BlackBoxAPI:
    """A teacher reachable only through ``predict(images)``; see the module docstring.

    ``teacher``: the module, which the API takes over (it is put in eval mode with gradients off and
    never handed out); ``mean``/``std``: the normalisation the teacher was trained with; ``name``:
    shown in messages and counts; ``classes``: the teacher's global class ids in output order, which
    BiDf-MKD's synthesizer is told (label j <-> ``classes[j]``); ``image_size``: the resolution the
    teacher was trained at (inputs of another size are resized by the API); ``output``, ``input``:
    see ``OUTPUTS``, ``INPUTS``; ``max_images``: this API's query cap; ``budget``: a shared
    ``QueryBudget``.
    """

    def __init__(self, teacher: nn.Module, mean: Sequence[float], std: Sequence[float], *, name: str = "api",
                 classes: Sequence[int] | None = None, image_size: int | None = None, output: str = "probs",
                 input: str = "uint8", max_images: int | None = None, budget: QueryBudget | None = None):
        if isinstance(teacher, BlackBoxAPI):
            raise TypeError("BlackBoxAPI wraps a teacher module, got another BlackBoxAPI")
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"BlackBoxAPI wraps an nn.Module, got {type(teacher).__name__}")
        if output not in OUTPUTS:
            raise UserError(f"API {name!r}: unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
        if input not in INPUTS:
            raise UserError(f"API {name!r}: unknown input {input!r}; choose one of {', '.join(INPUTS)}")
        if max_images is not None and int(max_images) < 0:
            raise UserError(f"API {name!r}: max_images must be >= 0 or None, got {max_images}")
        _check_per_image(teacher, name)
        teacher.eval().requires_grad_(False)
        # Name-mangled (stored as ``_BlackBoxAPI__teacher``): nothing in the package reaches it by
        # accident, and the attribute lookup of white-box code ends in ``__getattr__`` below.
        self.__teacher = teacher
        self.__device = module_device(teacher)
        # Plain tensors rather than a normalising closure, so the API pickles (Ray ships objects so).
        self.__mean = torch.as_tensor(mean, dtype=torch.float32, device=self.__device).view(1, -1, 1, 1)
        self.__std = torch.as_tensor(std, dtype=torch.float32, device=self.__device).view(1, -1, 1, 1)
        self.name = str(name)
        self.classes = None if classes is None else tuple(int(c) for c in classes)
        self.image_size = None if image_size is None else int(image_size)
        self.output, self.input = output, input
        self.max_images = None if max_images is None else int(max_images)
        self.budget = budget
        self.calls = 0
        self.images = 0

    @classmethod
    def from_zoo(cls, zoo_dir, record, mean: Sequence[float], std: Sequence[float], *,
                 device: str | torch.device = "cpu", **options) -> "BlackBoxAPI":
        """The zoo teacher ``record`` (checksum-verified, ``weights_only`` load) as an API named
        ``teacher <id>``, with the record's classes and training resolution."""
        from ..zoo.manifest import load_teacher      # lazy: the zoo package pulls in its Ray builder

        options.setdefault("name", f"teacher {record.teacher_id}")
        options.setdefault("classes", record.classes)
        options.setdefault("image_size", record.image_size)
        return cls(load_teacher(zoo_dir, record, device=device), mean, std, **options)

    # --- what a caller may know -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where queries are answered; images on another device are moved there and the answers back."""
        return self.__device

    @property
    def way(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    # --- queries --------------------------------------------------------------------------------
    def check_budget(self, n: int, use: str = "a query") -> None:
        """Raise ``BudgetExceeded`` if ``n`` more images would go past this API's or the run's cap.

        ``predict`` calls it for every query; a synthesizer may call it once with the cost of a whole
        recovery, so that a recovery that cannot finish does not start."""
        n = int(n)
        if self.max_images is not None and self.images + n > self.max_images:
            raise BudgetExceeded(
                f"{use} of {n} images to API {self.name!r} would exceed its query budget of {self.max_images} "
                f"images ({self.images} used in {self.calls} calls so far)")
        if self.budget is not None:
            self.budget.check(n, self.name, use)

    def predict(self, images: Tensor) -> Tensor:
        """The API's answer for ``images`` ([n, 3, S, S] floats in [0, 1]): ``[n, way]`` float32
        probabilities or logits, or ``[n]`` int64 labels; detached, on ``images.device``."""
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"API {self.name!r}: predict expects a float [n, C, H, W] batch in [0, 1], got {shape}")
        n = images.shape[0]
        self.check_budget(n)
        with torch.no_grad():
            x = images.detach().to(self.__device, torch.float32).clamp(0.0, 1.0)
            if self.input == "uint8":
                x = torch.round(x * 255.0) / 255.0
            if self.image_size is not None:
                x = resize(x, self.image_size)
            logits = self.__teacher((x - self.__mean) / self.__std).float()
            if self.output == "probs":
                out = F.softmax(logits, dim=1)
            elif self.output == "logits":
                out = logits
            else:
                out = logits.argmax(dim=1)
        self.calls += 1
        self.images += n
        if self.budget is not None:
            self.budget.charge(n)
        return out.to(images.device)

    # --- counters -------------------------------------------------------------------------------
    def counts(self) -> dict:
        """This API's totals as a plain dict: ``{"api", "calls", "images", "max_images"}``."""
        return {"api": self.name, "calls": self.calls, "images": self.images, "max_images": self.max_images}

    def restore(self, counts: Mapping) -> None:
        """Set this API's totals from a ``counts()`` dict (the shared run budget is restored on its own,
        with ``QueryBudget.restore``, since several APIs charge it)."""
        if counts.get("api", self.name) != self.name:
            raise ValueError(f"counts of API {counts.get('api')!r} restored into API {self.name!r}")
        self.calls, self.images = int(counts["calls"]), int(counts["images"])

    # --- everything else is white-box -----------------------------------------------------------
    def __call__(self, *args, **kwargs):
        raise TypeError(_whitebox_message(self.__dict__.get("name", "?"), "calling it like a module (forward)"))

    def __getattr__(self, attr: str):
        # Only reached when ordinary lookup fails, i.e. for anything that is not part of the API:
        # nn.Module's parameters(), state_dict(), named_modules(), register_forward_hook(), eval(),
        # training, ... Reads ``__dict__`` directly so that it is safe while unpickling.
        raise WhiteBoxAccessError(_whitebox_message(self.__dict__.get("name", "?"), f"attribute {attr!r}"))

    def __repr__(self) -> str:
        return (f"BlackBoxAPI({self.name!r}, output={self.output!r}, input={self.input!r}, "
                f"calls={self.calls}, images={self.images}, max_images={self.max_images})")


def require_white_box(teacher, what: str):
    """``teacher`` itself if it is a white-box module; a one-line ``UserError`` if it is a black-box API.

    For methods that need weights: BN statistics (DeepInversion, TGR's recovery), gradients through
    the teacher (every autograd inversion), Fisher embeddings."""
    if isinstance(teacher, BlackBoxAPI):
        raise UserError(f"{what} needs a white-box teacher (BN statistics / gradients); this pool's teachers "
                        f"are black-box APIs (teacher {teacher.name!r})")
    return teacher


def total_counts(counts: Iterable[Mapping]) -> dict:
    """The sum of several ``counts()`` dicts: ``{"calls", "images"}`` (e.g. a run's totals)."""
    calls = images = 0
    for c in counts:
        calls += int(c["calls"])
        images += int(c["images"])
    return {"calls": calls, "images": images}


__all__ = ["BlackBoxAPI", "BudgetExceeded", "INPUTS", "OUTPUTS", "QueryBudget", "WhiteBoxAccessError",
           "require_white_box", "total_counts"]
