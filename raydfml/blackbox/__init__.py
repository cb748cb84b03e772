"""Black-box teachers (BiDf-MKD): teachers reachable only as prediction APIs, and learning through them.

- ``api``: ``BlackBoxAPI`` (predict-only access with 8-bit inputs, query counters and budgets),
  ``QueryBudget``, ``require_white_box`` for methods that need weights.
- ``zeroorder``: the zero-order gradient estimator, its surrogate loss, and ``ZeroOrderRecovery``,
  BiDf-MKD's generator-based data recovery from an API.
"""
from .api import BlackBoxAPI, BudgetExceeded, QueryBudget, WhiteBoxAccessError, require_white_box, total_counts
from .zeroorder import ZeroOrderRecovery, ZOEstimate, ZORecovered, default_mu, zo_gradient, zo_surrogate

__all__ = ["BlackBoxAPI", "BudgetExceeded", "QueryBudget", "WhiteBoxAccessError", "require_white_box",
           "total_counts", "ZeroOrderRecovery", "ZOEstimate", "ZORecovered", "default_mu", "zo_gradient",
           "zo_surrogate"]
