"""The exact per-layer solver against independent references (MILP, brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linprog

from helpers.milp_oracle import milp_optimum
from sglang_fairkv.placement.solver import group_profiles, rank_times, sha_layer, solve_layer


def _instance(seed: int, heads: int, conc: float = 1.5):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(heads, conc)) * heads * rng.uniform(100, 2000)


def _check_valid(sol, w, ranks, k, c_head, c_token=1.0):
    assert len(sol.replicas) == len(w)
    for reps in sol.replicas:
        rs = [r for r, _ in reps]
        assert reps and len(set(rs)) == len(rs) and all(0 <= r < ranks for r in rs)
        assert all(s > 0 for _, s in reps)
        assert abs(sum(s for _, s in reps) - 1) < 1e-9
    assert sol.copies <= k
    np.testing.assert_allclose(sol.rank_time, rank_times(sol.replicas, w, ranks, c_head, c_token))


MILP_CASES_NO_COPIES = [(8, 4, 0.0), (8, 4, 50.0), (16, 8, 50.0), (16, 8, 0.0), (12, 5, 80.0),
                        (9, 2, 20.0), (3, 2, 9.0)]
MILP_CASES_COPIES = [(6, 3, 2, 100.0), (8, 8, 1, 50.0), (5, 4, 3, 30.0), (7, 3, 1, 60.0),
                     (3, 2, 1, 9.0), (4, 4, 3, 0.0)]


@pytest.mark.parametrize("heads,ranks,c_head", MILP_CASES_NO_COPIES)
def test_assignment_equals_milp_optimum(heads, ranks, c_head):
    for seed in range(2):
        w = _instance(seed * 100 + heads, heads)
        sol = solve_layer(w, ranks, 0, c_head)
        _check_valid(sol, w, ranks, 0, c_head)
        assert sol.optimal
        opt = milp_optimum(w, ranks, 0, c_head)
        assert sol.max_time == pytest.approx(opt, rel=1e-7), (w, ranks)


@pytest.mark.parametrize("heads,ranks,k,c_head", MILP_CASES_COPIES)
def test_fair_copying_equals_milp_optimum(heads, ranks, k, c_head):
    for seed in range(2):
        w = _instance(seed * 7 + heads * 3 + k, heads, conc=0.7)
        sol = solve_layer(w, ranks, k, c_head)
        _check_valid(sol, w, ranks, k, c_head)
        assert sol.optimal
        opt = milp_optimum(w, ranks, k, c_head)
        assert sol.max_time == pytest.approx(opt, rel=1e-7), (w, ranks, k)
        assert sol.lower_bound == pytest.approx(sol.max_time)


def test_large_instance_no_worse_than_milp_incumbent():
    """16 heads x 8 ranks with copies: HiGHS cannot prove optimality quickly; ours must be at least
    as good as the best solution it finds in its time limit, and ours is proven by B&B."""
    w = _instance(5, 16, conc=0.7)
    sol = solve_layer(w, 8, 2, 50.0)
    _check_valid(sol, w, 8, 2, 50.0)
    assert sol.optimal
    incumbent = milp_optimum(w, 8, 2, 50.0, time_limit=10, incumbent_ok=True)
    assert sol.max_time <= incumbent * (1 + 1e-7)
    # and never worse than the copy-free optimum or the continuous bound
    assert sol.max_time <= solve_layer(w, 8, 0, 50.0).max_time + 1e-9
    assert sol.max_time >= (w.sum() + 50.0 * 16) / 8 - 1e-9


def _brute_force(w, ranks, k, c_head):
    """Enumerate every replica set (rows: non-empty rank subsets, <= H + k in total) and solve the
    share LP for each: min T s.t. rank loads <= T. Independent of all structure."""
    H = len(w)
    subsets = [s for n in range(1, ranks + 1) for s in itertools.combinations(range(ranks), n)]
    best = np.inf
    for rows in itertools.product(subsets, repeat=H):
        if sum(len(s) for s in rows) > H + k or rows[0] != tuple(range(len(rows[0]))):
            continue  # over budget, or a rank relabelling of another (first head starts at rank 0)
        var = [(h, r) for h, s in enumerate(rows) for r in s]
        n = len(var) + 1
        c = np.zeros(n)
        c[-1] = 1
        A_ub = np.zeros((ranks, n))
        b_ub = np.zeros(ranks)
        for j, (h, r) in enumerate(var):
            A_ub[r, j] = w[h]
            b_ub[r] -= c_head
        A_ub[:, -1] = -1
        A_eq = np.zeros((H, n))
        for j, (h, _) in enumerate(var):
            A_eq[h, j] = 1
        res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=np.ones(H),
                      bounds=[(0, 1)] * len(var) + [(0, None)], method="highs")
        if res.status == 0:
            best = min(best, res.fun)
    return best


@pytest.mark.parametrize("seed", range(3))
def test_equals_brute_force_small(seed):
    w = _instance(seed, 4, conc=0.5)
    for k in (0, 1, 2):
        sol = solve_layer(w, 3, k, 40.0)
        assert sol.max_time == pytest.approx(_brute_force(w, 3, k, 40.0), rel=1e-7), (w, k)


def test_more_copies_never_hurt_and_reach_perfect_balance_without_head_cost():
    for seed in range(20):
        w = _instance(seed, 8, conc=0.5)
        vals = [solve_layer(w, 4, k, 30.0).max_time for k in range(4)]
        assert all(b <= a + 1e-9 for a, b in zip(vals, vals[1:]))
        # c_head = 0 and R - 1 copies: McNaughton gives exactly the mean
        assert solve_layer(w, 4, 3, 0.0).max_time == pytest.approx(w.sum() / 4, rel=1e-9)


def test_group_profiles_enumerate_copy_budgets():
    assert group_profiles(4, 0, 8) == [(1, 1, 1, 1)]
    assert sorted(group_profiles(4, 3, 8)) == sorted([(4,), (3, 1), (2, 2), (2, 1, 1), (1, 1, 1, 1)])
    assert all(4 - len(p) <= 1 for p in group_profiles(4, 1, 8))


def test_sha_is_contiguous_as_even_as_the_count_allows():
    w = np.arange(8, dtype=float) + 1
    sol = sha_layer(w, 4, 10.0)
    assert [reps for reps in sol.replicas] == [[(h // 2, 1.0)] for h in range(8)]
    assert sol.rank_time.tolist() == [23.0, 27.0, 31.0, 35.0]
    # uneven: the first ranks take one head more, in order (SGLang's padded split)
    assert [r[0][0] for r in sha_layer(np.ones(3), 2, 1.0).replicas] == [0, 0, 1]
    assert [r[0][0] for r in sha_layer(np.ones(7), 3, 1.0).replicas] == [0, 0, 0, 1, 1, 2, 2]
    assert sha_layer(np.array([1.0, 2.0, 4.0]), 2, 0.0).rank_time.tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="3 KV heads over tp=4: more ranks than KV heads"):
        sha_layer(np.ones(3), 4, 1.0)


def test_zero_length_heads_are_placed():
    sol = solve_layer(np.array([0.0, 0.0, 500.0, 10.0]), 2, 1, 5.0)
    assert all(sol.replicas[h] for h in range(4))
    assert abs(sum(s for _, s in sol.replicas[0]) - 1) < 1e-12


def test_node_limit_gives_a_valid_plan_and_a_true_lower_bound():
    w = _instance(9, 16, conc=0.7)
    exact = solve_layer(w, 8, 2, 50.0)
    cut = solve_layer(w, 8, 2, 50.0, node_limit=1)
    _check_valid(cut, w, 8, 2, 50.0)
    assert not cut.optimal
    assert cut.lower_bound <= exact.max_time + 1e-9 <= cut.max_time + 1e-9
