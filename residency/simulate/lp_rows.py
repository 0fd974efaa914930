"""LpRows: a linear program's constraint matrix built one row at a time, for scipy's milp (the planner's MILP in
policies/ours/milp.py and the lower bound in residency/simulate/bounds.py both build theirs this way)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import LinearConstraint


class LpRows:
    """The constraint matrix, one row at a time: lb ≤ row · x ≤ ub. Dense rows: these problems have tens to a
    few hundred columns, so a row is at most a few KB."""

    def __init__(self, nv: int) -> None:
        self.nv = nv
        self.rows: list[np.ndarray] = []
        self.lbs: list[float] = []
        self.ubs: list[float] = []

    def add(self, coeffs: dict[int, float], lb: float, ub: float) -> None:
        """Appends a row; coeffs maps column index to coefficient (repeated columns would add up)."""
        row = np.zeros(self.nv)
        for i, v in coeffs.items():
            row[i] += v
        self.rows.append(row)
        self.lbs.append(lb)
        self.ubs.append(ub)

    def constraint(self) -> LinearConstraint:
        """The rows added so far as one scipy constraint."""
        return LinearConstraint(np.array(self.rows), self.lbs, self.ubs)
