"""Parts registered outside the package (a method, a rule, a synthesizer or a backbone defined in the
user's own script, plug-in or test module) reach the Ray workers with the config.

Ray pickles what it sends with cloudpickle, which pickles a class by reference (module and name)
when its module can be imported. A user's module usually cannot be imported on a worker (a script,
a test file), so its modules are registered for pickling *by value*, and the config that goes to a
worker (``ExperimentConfig.for_workers``) carries the objects themselves; ``from_dict`` on the
worker registers them before it reads their option sections.
"""
from __future__ import annotations

import sys
from typing import Any

PACKAGE = "raydfml."


def _registries() -> dict[str, Any]:
    from .aggregation import RULES
    from .methods import METHODS
    from .models import BACKBONES
    from .synthesis import SYNTHESIZERS

    return {r.kind: r for r in (METHODS, RULES, SYNTHESIZERS, BACKBONES)}


def user_parts(cfg) -> list[tuple[str, str, Any]]:
    """``(registry kind, name, object)`` for each part ``cfg`` names that was registered outside the package."""
    regs = _registries()
    out = []
    named = [("method", cfg.method), ("aggregation rule", cfg.aggregate.rule), ("synthesizer", cfg.synth.name)]
    named += [("backbone", arch) for arch in dict.fromkeys((*cfg.pool.archs, cfg.learner.arch))]
    for kind, name in named:
        obj = regs[kind].get(name)
        module = getattr(obj, "__module__", "") or ""
        if not module.startswith(PACKAGE):
            _pickle_by_value(module)
            out.append((kind, name, obj))
    return out


def install(parts: list[tuple[str, str, Any]] | None) -> None:
    """Register shipped parts in this process (a worker), replacing any stale entry of the same name."""
    if not parts:
        return
    regs = _registries()
    for kind, name, obj in parts:
        regs[kind].register(name, obj, replace=True)


def _pickle_by_value(module: str) -> None:
    mod = sys.modules.get(module)
    if mod is None or module == "__main__":         # cloudpickle already pickles __main__ by value
        return
    import ray.cloudpickle as cloudpickle

    cloudpickle.register_pickle_by_value(mod)


def import_plugins(modules) -> None:
    """Import the user's plug-in modules (``launch.py --plugin my_pkg.models``): their registrations
    run here, and what the config names of them is shipped to the workers by value."""
    import importlib

    from .errors import UserError

    for module in modules or ():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"--plugin {module}: cannot import it ({e}); is it on PYTHONPATH?") from None


__all__ = ["import_plugins", "install", "user_parts"]
