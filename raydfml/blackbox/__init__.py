"""Black-box teachers (BiDf-MKD): teachers reachable only as prediction APIs, and learning through them.

- ``api``: ``BlackBoxAPI`` (predict-only access with 8-bit inputs, query counters and budgets),
  ``QueryBudget``, ``require_white_box`` for methods that need weights.
"""
from .api import BlackBoxAPI, BudgetExceeded, QueryBudget, WhiteBoxAccessError, require_white_box, total_counts

__all__ = ["BlackBoxAPI", "BudgetExceeded", "QueryBudget", "WhiteBoxAccessError", "require_white_box",
           "total_counts"]
