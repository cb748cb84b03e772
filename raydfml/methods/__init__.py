"""Methods: each data-free meta-learning method is one registered unit (``--method <name>``).

A method module holds its preset, its option section, its teacher-side work (what a TeacherPool
actor does for one teacher), its central step and state (what the MetaLearner keeps and
checkpoints) and its round plan; :class:`~raydfml.methods.base.Method` documents the hooks. The
runtime calls the hooks and names no method, so adding one is a module plus its tests::

    from raydfml.methods import TeacherRecovery, register_method

    @register_method("geninv")
    class GeneratorInversionMethod(TeacherRecovery):
        preset = {"synth.name": "generator"}

Built in: ``deepinv`` (pixel DeepInversion per teacher), ``geninv`` (generator inversion per
teacher), ``purer`` (PURER's learnable dataset and episode curriculum), ``free`` (FREE's
meta-generator and alignment), ``tgr`` (TGR's task groups and implicit gradient regularisation).
"""
from .base import Method, TeacherRecovery
from .registry import BUILTIN_METHODS, METHODS, create_method, get_method, method_names, register_method

__all__ = ["BUILTIN_METHODS", "METHODS", "Method", "TeacherRecovery", "create_method", "get_method", "method_names",
           "register_method"]
