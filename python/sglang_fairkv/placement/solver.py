"""Exact per-layer placement: heads -> ranks, with up to ``K`` extra replicas (Fair-Copying).

Problem (one layer). KV heads ``h`` with whole cost ``p[h] = c_head + c_token * w[h]``, ``R`` ranks.
Each head gets >= 1 replica on distinct ranks and shares summing to 1; a replica costs ``c_head`` on
its rank plus its share of the token work. Minimise the maximum rank time using at most ``K``
extra replicas.

Structure we exploit (proved in ``placement/README.md``):
  1. Some optimal solution has a head-rank replica graph that is a forest (shift shares around a
     cycle until a replica empties, which only removes a ``c_head``). A tree spanning ``r`` ranks
     uses exactly ``r - 1`` copies.
  2. A group of ``r`` ranks can serve head set ``S`` with maximum rank time ``T`` iff
     ``P(S) + c_head * (r - 1) <= r * T`` (McNaughton's wrap-around, with ``c_head`` charged at each
     cut; a cut whose leftover is <= ``c_head`` is skipped and costs nothing).
So the layer optimum is: partition ``R`` into rank groups ``r_1..r_m`` (``R - m <= K`` copies) and
the heads into ``m`` sets, minimising ``max_i (P(S_i) + c_head (r_i - 1)) / r_i`` — makespan on
"uniform machines" with speed ``r_i`` and offset ``c_head (r_i - 1)``, solved here by branch and
bound over each group profile (exact; symmetric bins pruned, bounds from the continuous
relaxation). ``K = 0`` is Best-effort Assignment (multiprocessor scheduling).

The tests check the optimum against an independent MILP (``scipy.optimize.milp``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-9


@dataclass(frozen=True)
class LayerSolution:
    """One layer's placement.

    ``replicas[h]``: list of ``(rank, share)`` for KV head ``h`` (shares sum to 1).
    ``rank_time``: float64 ``[R]`` cost-model time of each rank.
    ``optimal``: True when branch and bound finished (the max is the exact optimum).
    ``lower_bound``: a proven lower bound on the optimum (equals the max when optimal).
    """

    replicas: list[list[tuple[int, float]]]
    rank_time: np.ndarray
    optimal: bool
    lower_bound: float

    @property
    def max_time(self) -> float:
        return float(self.rank_time.max())

    @property
    def copies(self) -> int:
        return sum(len(r) - 1 for r in self.replicas)


def rank_times(replicas: list[list[tuple[int, float]]], w: np.ndarray, num_ranks: int,
               c_head: float, c_token: float) -> np.ndarray:
    """Cost-model time per rank, float64 ``[num_ranks]``."""
    t = np.zeros(num_ranks)
    for h, reps in enumerate(replicas):
        for rank, share in reps:
            t[rank] += c_head + c_token * share * w[h]
    return t


def rank_memory(replicas: list[list[tuple[int, float]]], w: np.ndarray, num_ranks: int) -> np.ndarray:
    """Mean KV tokens per request held by each rank, float64 ``[num_ranks]``."""
    m = np.zeros(num_ranks)
    for h, reps in enumerate(replicas):
        for rank, share in reps:
            m[rank] += share * w[h]
    return m


def group_profiles(num_ranks: int, max_copies: int, num_heads: int) -> list[tuple[int, ...]]:
    """Partitions of ``num_ranks`` into group sizes (non-increasing) using <= ``max_copies`` copies.

    A profile with ``m`` groups uses ``num_ranks - m`` copies; groups beyond ``num_heads`` would
    stay empty and are useless, so profiles with only single-rank groups beyond that are dropped.
    """
    out: list[tuple[int, ...]] = []

    def rec(remaining: int, largest: int, acc: list[int]):
        if remaining == 0:
            if num_ranks - len(acc) <= max_copies:
                out.append(tuple(acc))
            return
        for size in range(min(remaining, largest), 0, -1):
            # copies so far + at least the copies of this group
            if (sum(a - 1 for a in acc) + size - 1) > max_copies:
                continue
            rec(remaining - size, size, acc + [size])

    rec(num_ranks, num_ranks, [])
    # Groups beyond the number of heads are empty: keep only profiles whose multi-rank groups
    # can all be non-empty.
    return [p for p in out if sum(1 for s in p if s > 1) <= num_heads]


def _value(load: float, size: int, c_head: float) -> float:
    return (load + c_head * (size - 1)) / size


def _solve_profile(p: np.ndarray, order: np.ndarray, sizes: tuple[int, ...], c_head: float,
                   best: float, node_limit: int) -> tuple[float, list[int] | None, bool]:
    """Branch and bound for one group profile. Returns (value, head->group or None, finished)."""
    m = len(sizes)
    total_speed = float(sum(sizes))
    offsets = sum(c_head * (s - 1) for s in sizes)
    lb = (float(p.sum()) + offsets) / total_speed
    biggest = float(p[order[0]]) if len(order) else 0.0
    lb = max(lb, _value(biggest, max(sizes), c_head))
    if lb >= best - EPS:
        return best, None, True
    node_limit = max(node_limit, len(order) + 1)  # the first (greedy) dive always completes
    loads = [0.0] * m
    assign = [-1] * len(p)
    best_assign: list[int] | None = None
    nodes = 0
    finished = True
    suffix = np.concatenate([np.cumsum(p[order][::-1])[::-1], [0.0]])

    def rec(i: int, cur_max: float):
        nonlocal best, best_assign, nodes, finished
        nodes += 1
        if nodes > node_limit:
            finished = False
            return
        if i == len(order):
            if cur_max < best - EPS:
                best, best_assign = cur_max, list(assign)
            return
        # continuous bound: remaining work spread perfectly over all groups
        spread = (sum(loads) + suffix[i] + offsets) / total_speed
        if max(cur_max, spread) >= best - EPS:
            return
        h = order[i]
        seen: set[tuple[int, float]] = set()
        # try groups in order of resulting value (good solutions first)
        cand = sorted(range(m), key=lambda g: _value(loads[g] + p[h], sizes[g], c_head))
        for g in cand:
            key = (sizes[g], round(loads[g], 9))
            if key in seen:
                continue  # an identical group was already tried: symmetric
            seen.add(key)
            v = _value(loads[g] + p[h], sizes[g], c_head)
            if v >= best - EPS:
                break  # candidates are sorted: no later one is better
            loads[g] += p[h]
            assign[h] = g
            rec(i + 1, max(cur_max, v))
            loads[g] -= p[h]
            assign[h] = -1
            if lb >= best - EPS:
                return  # reached the lower bound: optimal

    rec(0, max((_value(0.0, s, c_head) for s in sizes), default=0.0))
    return best, best_assign, finished


def _wrap_around(heads: list[int], a: np.ndarray, ranks: list[int], c_head: float,
                 capacity: float) -> dict[int, list[tuple[int, float]]]:
    """McNaughton wrap-around of ``heads`` (work ``a[h]`` = c_token * w) over ``ranks``.

    Every rank is filled to ``capacity``; a head cut at a rank boundary pays ``c_head`` on both
    ranks. Returns ``{head: [(rank, share), ...]}``.
    """
    out: dict[int, list[tuple[int, float]]] = {}
    idx, load = 0, 0.0
    tol = 1e-9 * max(1.0, capacity)
    for h in heads:
        remaining = float(a[h])
        parts: list[tuple[int, float]] = []
        while True:
            last = idx == len(ranks) - 1
            avail = capacity - load - c_head
            if last or avail >= remaining - tol:
                load += c_head + remaining
                parts.append((ranks[idx], remaining))
                break
            if avail > tol:
                parts.append((ranks[idx], avail))
                remaining -= avail
            idx, load = idx + 1, 0.0  # rank full (or leftover too small to be worth a copy)
        if a[h] > 0:
            out[h] = [(r, float(x / a[h])) for r, x in parts if x > 0] or [(parts[-1][0], 1.0)]
        else:
            out[h] = [(parts[0][0], 1.0)]
    return out


def solve_layer(w: np.ndarray, num_ranks: int, max_copies: int, c_head: float,
                c_token: float = 1.0, node_limit: int = 2_000_000) -> LayerSolution:
    """Optimal placement of one layer's KV heads (see module docstring).

    Parameters
    ----------
    w : float64 ``[num_kv_heads]``, mean kept tokens per request of each KV head.
    num_ranks : TP size ``R`` >= 1.
    max_copies : extra replicas allowed in this layer (0 = Best-effort Assignment).
    c_head, c_token : the cost model (:class:`~sglang_fairkv.placement.cost.CostModel`).
    node_limit : branch-and-bound nodes per profile before giving up optimality (never hit at
        the sizes FairKV sees; ``optimal`` says if it was).
    """
    w = np.asarray(w, dtype=np.float64)
    if num_ranks < 1 or max_copies < 0:
        raise ValueError(f"need num_ranks >= 1 and max_copies >= 0, got {num_ranks}, {max_copies}")
    a = c_token * w
    p = c_head + a
    order = np.argsort(-p, kind="stable")
    best, best_sol, all_finished = np.inf, None, True
    for sizes in group_profiles(num_ranks, max_copies, len(w)):
        val, assign, finished = _solve_profile(p, order, sizes, c_head, best, node_limit)
        all_finished &= finished
        if assign is not None and val < best:
            best, best_sol = val, (sizes, assign)
    assert best_sol is not None, "no feasible profile (cannot happen: all-singletons always is)"
    sizes, assign = best_sol
    # Materialise: group g gets consecutive ranks; heads of a group wrap around its ranks.
    replicas: list[list[tuple[int, float]]] = [[] for _ in w]
    start = 0
    for g, size in enumerate(sizes):
        ranks = list(range(start, start + size))
        start += size
        heads = sorted((h for h in range(len(w)) if assign[h] == g), key=lambda h: -a[h])
        if not heads:
            continue
        cap = _value(float(p[heads].sum()), size, c_head)
        for h, parts in _wrap_around(heads, a, ranks, c_head, cap).items():
            replicas[h] = parts
    t = rank_times(replicas, w, num_ranks, c_head, c_token)
    # Proven lower bound: the branch-and-bound value when it finished, else the continuous
    # relaxation (every head held once, its cost spread perfectly over the ranks).
    lower = best if all_finished else min(best, float(p.sum()) / num_ranks)
    return LayerSolution(replicas=replicas, rank_time=t, optimal=all_finished, lower_bound=lower)


def sha_layer(w: np.ndarray, num_ranks: int, c_head: float, c_token: float = 1.0) -> LayerSolution:
    """Standard TP: contiguous KV heads, as even as the count allows -- ``ceil(H / R)`` heads on the first
    ``H mod R`` ranks, ``floor(H / R)`` on the rest (the layout SGLang's head padding gives when ``R``
    does not divide ``H``: 3 heads at TP 2 are 2 + 1). Raises ValueError for more ranks than heads."""
    h = len(w)
    if num_ranks > h:
        raise ValueError(
            f"{h} KV heads over tp={num_ranks}: more ranks than KV heads leaves a rank without a head in "
            "every layer (stock SGLang replicates KV heads); use strategy fairkv with copies")
    base, extra = divmod(h, num_ranks)
    owner = np.repeat(np.arange(num_ranks), [base + (r < extra) for r in range(num_ranks)])
    replicas = [[(int(owner[i]), 1.0)] for i in range(h)]
    t = rank_times(replicas, np.asarray(w, float), num_ranks, c_head, c_token)
    return LayerSolution(replicas=replicas, rank_time=t, optimal=False, lower_bound=0.0)
