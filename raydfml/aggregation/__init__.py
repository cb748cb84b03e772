"""Aggregation rules: how the MetaLearner combines a round's per-teacher work into one meta-update.

Rules are found by name in ``RULES`` (``aggregate.rule``): ``mean`` (the plain average),
``align`` (FREE's implicit gradient alignment, :mod:`.free`) and ``igr`` (TGR's implicit gradient
regularisation, :mod:`.tgr`). :mod:`.registry` describes the contract; adding a rule is one
decorated function or class. TGR's task space (Fisher embeddings, heterogeneous groups) is in
:mod:`.task_space`. Task weighting (MTM: ``aggregate.weighting``, per-key weights of the teachers'
meta-gradients and of replay tasks) is in :mod:`.weighting`, a registry of its own (``WEIGHTINGS``).
"""
from .registry import NEEDS, RULES, FunctionRule, Rule, RuleContext, build_rule, mean_of, register_rule
from .weighting import WEIGHTINGS, Weighting, build_weighting, register_weighting

__all__ = ["NEEDS", "RULES", "FunctionRule", "Rule", "RuleContext", "build_rule", "mean_of", "register_rule",
           "WEIGHTINGS", "Weighting", "build_weighting", "register_weighting"]
