"""The method registry: every data-free meta-learning method by name (``--method``)."""
from __future__ import annotations

from ..registry import Registry

BUILTIN_METHODS = ("deepinv", "geninv", "purer", "free", "tgr", "bidf")

METHODS = Registry("method", builtins=tuple(f"raydfml.methods.{name}" for name in BUILTIN_METHODS))


def register_method(name: str):
    """Class decorator: register a ``Method`` subclass as ``name`` (also sets its ``name``)."""
    def add(cls):
        cls.name = name
        return METHODS.register(name, cls)
    return add


def get_method(name: str):
    """The ``Method`` class registered as ``name`` (a one-line ``UserError`` for an unknown name)."""
    return METHODS.get(name, option="--method")


def create_method(cfg):
    """An instance of the config's method for one role (driver, TeacherPool or MetaLearner)."""
    return get_method(cfg.method)(cfg)


def method_names() -> list[str]:
    return METHODS.names()


__all__ = ["BUILTIN_METHODS", "METHODS", "create_method", "get_method", "method_names", "register_method"]
