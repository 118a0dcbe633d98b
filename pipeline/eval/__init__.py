"""Evaluation helpers that are not model code: DVT budgeted inference (``dvt_budget``)."""

from .dvt_budget import BudgetReport, calibrate_and_sweep

__all__ = ["BudgetReport", "calibrate_and_sweep"]
