"""Registries by name, in the manner of timm's ``@register_model`` + ``create_model``.

A ``Registry`` maps names to objects (classes or functions) of one kind: methods, aggregation
rules, per-teacher synthesizers. Parts register themselves with a decorator where they are
defined; the runtime finds them by the name in the config and never names one itself.

The package's own parts live in modules listed as ``builtins``: they are imported the first time the
registry is read, so a registry can be queried from low-level code (``config.validate``) without that
code importing the parts (which would close an import circle). A user's own part registers by being
imported before the run starts (a test module, a plug-in); on Ray, the actors import the module that
defines it when they unpickle the config that names it.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, Sequence

from .errors import UserError


class Registry:
    def __init__(self, kind: str, builtins: Sequence[str] = ()):
        self.kind = kind
        self._builtins = tuple(builtins)
        self._loaded = not self._builtins
        self._entries: dict[str, Any] = {}

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True            # first: a builtin module may read the registry while importing
            for module in self._builtins:
                importlib.import_module(module)

    def register(self, name: str, obj: Any = None, *, replace: bool = False) -> Callable[[Any], Any] | Any:
        """Register ``obj`` as ``name`` (or use as a decorator: ``@REG.register("name")``).

        Registering a taken name is a ``ValueError`` unless ``replace`` (re-importing a module that
        registered the same object is harmless and allowed).
        """
        def add(o: Any) -> Any:
            old = self._entries.get(name)
            same = old is not None and getattr(old, "__qualname__", None) == getattr(o, "__qualname__", None) \
                and getattr(old, "__module__", None) == getattr(o, "__module__", None)
            if old is not None and not (replace or same):
                raise ValueError(f"{self.kind} {name!r} is already registered ({old!r})")
            self._entries[name] = o
            return o
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a toy part clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str, option: str | None = None) -> Any:
        """The entry called ``name``; an unknown name is a one-line ``UserError`` that lists the choices
        (and names ``option``, e.g. ``--method`` or ``config aggregate.rule``, when given)."""
        self._load_builtins()
        if name not in self._entries:
            where = f"{option} {name!r}" if option else f"unknown {self.kind} {name!r}"
            raise UserError(f"{where}: choose one of {', '.join(self.names())}" if option else
                            f"{where}; choose one of {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load_builtins()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


__all__ = ["Registry"]
