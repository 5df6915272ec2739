"""Deprecated: rank rules and budgets moved to :mod:`onnx_lowrank.linalg`; this name stays for one release."""

from __future__ import annotations

from .linalg.allocate import BudgetError, Options, allocate, rank_options  # noqa: F401
from .linalg.rank import RULES, RankChoice, choice_at, choose_rank  # noqa: F401

__all__ = ["RankChoice", "choose_rank", "choice_at", "RULES", "Options", "rank_options", "allocate", "BudgetError"]
