"""Independent exact oracle for one layer's placement: the textbook MILP, solved by HiGHS.

Variables: x[h,r] in {0,1} (head h has a replica on rank r), s[h,r] in [0,1] its share, T.
    min T
    sum_r s[h,r] = 1                      every head fully served
    s[h,r] <= x[h,r]                      shares only where replicas are
    sum_{h,r} x[h,r] <= H + K             copy budget (>= H is implied)
    c_head * sum_h x[h,r] + c_token * sum_h w[h] s[h,r] <= T     for every rank
    load[r] >= load[r+1]                  rank symmetry breaking (ranks are identical)
Knows nothing about the forest/profile structure the production solver relies on.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix


def milp_optimum(w, num_ranks: int, max_copies: int, c_head: float, c_token: float = 1.0,
                 time_limit: float = 120.0, incumbent_ok: bool = False) -> float:
    """The optimum (or, with ``incumbent_ok``, the best solution found within ``time_limit``)."""
    w = np.asarray(w, float)
    H, R = len(w), num_ranks
    nx = H * R
    n = 2 * nx + 1
    X = lambda h, r: h * R + r
    S = lambda h, r: nx + h * R + r
    T = n - 1
    rows = H + nx + R + 1 + (R - 1)
    A = lil_matrix((rows, n))
    lb, ub = [], []
    i = 0
    for h in range(H):
        for r in range(R):
            A[i, S(h, r)] = 1
        lb.append(1), ub.append(1)
        i += 1
    for h in range(H):
        for r in range(R):
            A[i, S(h, r)], A[i, X(h, r)] = 1, -1
            lb.append(-np.inf), ub.append(0)
            i += 1
    for r in range(R):
        for h in range(H):
            A[i, X(h, r)], A[i, S(h, r)] = c_head, c_token * w[h]
        A[i, T] = -1
        lb.append(-np.inf), ub.append(0)
        i += 1
    for h in range(H):
        for r in range(R):
            A[i, X(h, r)] = 1
    lb.append(H), ub.append(H + max_copies)
    i += 1
    for r in range(R - 1):
        for h in range(H):
            A[i, X(h, r)] += c_head
            A[i, S(h, r)] += c_token * w[h]
            A[i, X(h, r + 1)] -= c_head
            A[i, S(h, r + 1)] -= c_token * w[h]
        lb.append(0), ub.append(np.inf)
        i += 1
    c = np.zeros(n)
    c[T] = 1
    integrality = np.zeros(n)
    integrality[:nx] = 1
    res = milp(c, constraints=LinearConstraint(A.tocsr(), lb, ub), integrality=integrality,
               bounds=Bounds(np.zeros(n), np.r_[np.ones(2 * nx), np.inf]),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
    if incumbent_ok and res.status == 1 and res.x is not None:
        return float(res.fun)
    assert res.status == 0, f"MILP not solved to optimality: {res.message}"
    return float(res.fun)
