"""Solvers: choose one option per unit under the budget (see DESIGN.md, "solvers")."""
from .base import NEEDS_MODEL, SOLVERS, Problem, Solver, get_solver

__all__ = ["Problem", "Solver", "SOLVERS", "NEEDS_MODEL", "get_solver"]
