"""Stats -> plan: the single entry point :func:`build_plan` and its steps.

Steps (strategy ``fairkv``):
  1. per layer and copy count ``k = 0..K``: the exact optimum (``solver.solve_layer``);
  2. copies per layer: at most ``K`` each, and, with a global budget (copies or weight bytes), the
     split of that budget over layers that minimises the summed per-layer maxima (exact DP);
  3. rank relabelling per layer so that KV memory summed over layers is balanced across ranks
     (free: permuting ranks inside a layer keeps its time).
``assign`` is the same with ``K = 0``; ``sha`` is SGLang's contiguous split.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .cost import CostModel, default_cost_model
from .metrics import copy_weight_bytes, evaluate
from .schema import STRATEGIES, Plan
from .solver import LayerSolution, rank_memory, sha_layer, solve_layer
from .stats import KVStats

OBJECTIVES = ("time", "memory")


def allocate_copies(costs: np.ndarray, budget: int) -> list[int]:
    """Copies per layer minimising ``sum_l costs[l, k_l]`` with ``sum_l k_l <= budget``.

    ``costs``: float64 ``[L, K+1]``, ``costs[l, k]`` = layer ``l``'s optimum with ``k`` copies
    (non-increasing in ``k``). Exact dynamic program over the budget, O(L * budget * K).
    """
    L, kp1 = costs.shape
    budget = min(budget, L * (kp1 - 1))
    INF = float("inf")
    dp = np.full(budget + 1, INF)
    dp[0] = 0.0
    choice = np.zeros((L, budget + 1), dtype=np.int64)
    for l in range(L):
        new = np.full(budget + 1, INF)
        for b in range(budget + 1):
            for k in range(min(kp1 - 1, b) + 1):
                v = dp[b - k] + costs[l, k]
                if v < new[b] - 1e-12:
                    new[b], choice[l, b] = v, k
        dp = new
    b = int(np.argmin(dp))
    ks = [0] * L
    for l in range(L - 1, -1, -1):
        ks[l] = int(choice[l, b])
        b -= ks[l]
    return ks


def balance_rank_labels(layers: list[list[list[tuple[int, float]]]], w: np.ndarray,
                        tp: int) -> list[list[list[tuple[int, float]]]]:
    """Permute rank labels inside each layer to balance KV memory summed over layers (LPT)."""
    mems = [rank_memory(layer, w[l], tp) for l, layer in enumerate(layers)]
    total = np.zeros(tp)
    out: list = [None] * len(layers)
    for l in sorted(range(len(layers)), key=lambda l: -float(np.ptp(mems[l]))):
        perm = {}
        free = list(range(tp))
        for r in sorted(range(tp), key=lambda r: -mems[l][r]):
            target = min(free, key=lambda x: (total[x], x))
            free.remove(target)
            perm[r] = target
            total[target] += mems[l][r]
        out[l] = [sorted(((perm[r], s) for r, s in reps)) for reps in layers[l]]
    return out


def stats_source(stats: KVStats) -> dict:
    """A plan's ``source`` field: the per-(layer, head) means it was made for, and their provenance."""
    return {"kv_len_mean": np.asarray(stats.kv_len_mean, dtype=np.float64).round(3).tolist(),
            "samples": stats.samples, "method": stats.method, "model": stats.model}


def build_plan(stats: KVStats, tp: int, strategy: str = "fairkv", cost: CostModel | None = None,
               max_copies_per_layer: int = 2, max_copies_total: int | None = None,
               max_extra_weight_bytes: int | None = None, objective: str = "time",
               balance_memory: bool = True) -> tuple[Plan, list[float]]:
    """Plan ``stats`` for TP size ``tp``. Returns ``(plan, per-layer lower bounds)``.

    ``objective="memory"`` optimises per-layer KV memory (solves with ``c_head = 0``) instead of
    time; the plan's metrics are still reported with ``cost``.
    """
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if max_copies_per_layer < 0:
        raise ValueError(f"max copies per layer must be >= 0, got {max_copies_per_layer}")
    cost = cost or default_cost_model(stats.group_size, stats.hidden)
    w = stats.kv_len_mean
    solve_c_head = 0.0 if objective == "memory" else cost.c_head

    if strategy == "sha":
        sols = [sha_layer(w[l], tp, cost.c_head, cost.c_token) for l in range(stats.num_layers)]
        # sha copies nothing: its gap is measured against the best copy-free placement.
        lbs = [solve_layer(w[l], tp, 0, cost.c_head, cost.c_token).lower_bound
               for l in range(stats.num_layers)]
        layers = [s.replicas for s in sols]
    else:
        kmax = 0 if strategy == "assign" else min(max_copies_per_layer, tp - 1)
        table: list[list[LayerSolution]] = [
            [solve_layer(w[l], tp, k, solve_c_head, cost.c_token) for k in range(kmax + 1)]
            for l in range(stats.num_layers)]
        budget = stats.num_layers * kmax
        if max_copies_total is not None:
            budget = min(budget, max_copies_total)
        if max_extra_weight_bytes is not None:
            budget = min(budget, int(max_extra_weight_bytes // copy_weight_bytes(stats)))
        costs = np.array([[s.max_time for s in row] for row in table])
        ks = allocate_copies(costs, budget) if budget < stats.num_layers * kmax else [kmax] * stats.num_layers
        chosen = [table[l][k] for l, k in enumerate(ks)]
        layers = [s.replicas for s in chosen]
        lbs = [s.lower_bound for s in chosen] if objective == "time" else [0.0] * len(chosen)
        if balance_memory:
            layers = balance_rank_labels(layers, w, tp)
    plan = Plan(model=stats.model, tp=tp, num_kv_heads=stats.num_kv_heads, strategy=strategy,
                cost_model={**cost.to_json(), "objective": objective,
                            "max_copies_per_layer": max_copies_per_layer if strategy == "fairkv" else 0},
                layers=layers, num_q_heads=stats.num_q_heads, source=stats_source(stats))
    return replace(plan, predicted=evaluate(plan, stats, lbs if objective == "time" else None)), lbs
