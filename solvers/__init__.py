"""Solvers: choose one option per unit under the budget (see DESIGN.md, "solvers")."""
from .base import Problem, Solver, SOLVERS, get_solver

__all__ = ["Problem", "Solver", "SOLVERS", "get_solver"]
