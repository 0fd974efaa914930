"""LpRows: a linear program's constraint matrix built one row at a time, for scipy's milp (the planner's MILP in
policies/ours/milp.py and the lower bound in residency/simulate/bounds.py both build theirs this way)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import LinearConstraint
from scipy.sparse import coo_array


class LpRows:
    """The constraint matrix, one row at a time: lb ≤ row · x ≤ ub, kept as coordinates and handed to scipy as a
    sparse matrix (milp converts a dense one to sparse itself). Sparse also for a hazard: scipy builds a
    LinearConstraint from a dense matrix inside `warnings.catch_warnings()` with every warning an error, process-wide
    for that moment, so a solve on another thread (policies.ours.parallel) that warned then would raise."""

    def __init__(self, nv: int) -> None:
        self.nv = nv
        self.row_index: list[int] = []
        self.col_index: list[int] = []
        self.values: list[float] = []
        self.lbs: list[float] = []
        self.ubs: list[float] = []

    def add(self, coeffs: dict[int, float], lb: float, ub: float) -> None:
        """Appends a row; coeffs maps column index to coefficient (repeated columns would add up)."""
        row = len(self.lbs)
        for i, v in coeffs.items():
            if not 0 <= i < self.nv:
                raise IndexError(f"column {i} of a {self.nv}-column program")
            self.row_index.append(row)
            self.col_index.append(i)
            self.values.append(v)
        self.lbs.append(lb)
        self.ubs.append(ub)

    def constraint(self) -> LinearConstraint:
        """The rows added so far as one scipy constraint."""
        matrix = coo_array((np.asarray(self.values, dtype=np.float64), (self.row_index, self.col_index)),
                           shape=(len(self.lbs), self.nv)).tocsc()  # duplicates summed, as add() promises
        matrix.eliminate_zeros()  # the entries scipy keeps of a dense matrix: the solver sees the same problem
        return LinearConstraint(matrix, self.lbs, self.ubs)
