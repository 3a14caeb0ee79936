"""How good a plan is under the cost model: busy rates, memory balance, copies, speedup."""

from __future__ import annotations

import numpy as np

from .balance import busy_rate, layer_balance
from .schema import Plan
from .solver import rank_memory, rank_times
from .stats import KVStats

WEIGHT_BYTES = 2  # bf16/fp16 weights


def copy_weight_bytes(stats: KVStats, dtype_bytes: int = WEIGHT_BYTES) -> int:
    """Extra weight bytes of one copied KV head in one layer: its Q (group), K, V rows and O columns."""
    return (2 * stats.group_size + 2) * stats.head_dim * stats.hidden * dtype_bytes


def rank_time_matrix(plan: Plan, stats: KVStats) -> np.ndarray:
    """Cost-model time of every rank in every layer under the plan's own cost model, float64 [L, R]."""
    c_head, c_token = plan.cost_model["c_head"], plan.cost_model["c_token"]
    return np.stack([rank_times(layer, stats.kv_len_mean[l], plan.tp, c_head, c_token)
                     for l, layer in enumerate(plan.layers)])


def evaluate(plan: Plan, stats: KVStats, lower_bounds: list[float] | None = None) -> dict:
    """Cost-model metrics of ``plan`` on ``stats``.

    Returns a dict (JSON-ready): ``layer_max`` / ``layer_mean`` ``[L]`` rank times,
    ``attention_busy_rate`` (:func:`~sglang_fairkv.placement.balance.busy_rate` of the rank times: sum
    of per-layer means / sum of per-layer maxima), ``min_layer_balance`` (the worst layer's mean / max),
    ``rank_memory`` ``[R]`` (mean KV tokens per request summed over layers), ``memory_busy_rate`` (its
    busy rate), ``attention_time`` (sum of per-layer maxima, the step's
    attention critical path), ``copies``, ``extra_weight_bytes`` and, with ``lower_bounds``,
    ``optimality_gap`` = attention_time / sum(lower bounds) - 1.
    """
    times = rank_time_matrix(plan, stats)  # [L, R]
    mem = np.stack([rank_memory(layer, stats.kv_len_mean[l], plan.tp)
                    for l, layer in enumerate(plan.layers)]).sum(axis=0)  # [R]
    lmax, lmean = times.max(axis=1), times.mean(axis=1)
    copies = sum(plan.copies_per_layer())
    out = {
        "attention_time": float(lmax.sum()),
        "attention_busy_rate": busy_rate(times.T),
        "min_layer_balance": float(layer_balance(times.T).min()),
        "memory_busy_rate": busy_rate(mem),
        "rank_memory": mem.round(3).tolist(),
        "copies": copies,
        "max_copies_in_a_layer": max(plan.copies_per_layer(), default=0),
        "extra_weight_bytes": copies * copy_weight_bytes(stats),
        "layer_max": lmax.round(4).tolist(),
        "layer_mean": lmean.round(4).tolist(),
    }
    if lower_bounds is not None:
        lb = float(np.sum(lower_bounds))
        out["lower_bound"] = lb
        out["optimality_gap"] = float(lmax.sum() / lb - 1.0) if lb > 0 else 0.0
    return out
