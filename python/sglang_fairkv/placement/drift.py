"""Does the running plan still fit the traffic? Live kept shares vs the plan's source stats (pure).

A plan is made from per-(layer, KV head) mean kept tokens measured on some prompts (its ``source``).
What it balances is each layer's split of those tokens over the ranks, so what matters is how each
layer's kept tokens *share out* over its heads, not their absolute size (a longer prompt mix scales
every head alike and leaves the best plan unchanged). Two numbers:

* **share drift** of a layer: the total-variation distance between the live and the source shares of
  its heads, ``0.5 * sum_h |live[h] / sum(live) - src[h] / sum(src)|`` in ``[0, 1]`` (0: the same
  split; 1: disjoint heads). Reported as the mean over layers (weighted by the live tokens of each
  layer) and the worst layer.
* **re-plan gain**: the planner's cost model (:mod:`.cost`) on the live means: the attention critical
  path (sum over layers of the slowest rank) of the running plan over that of a fresh plan made from
  the live means with the same strategy and copy limit (a ``sha`` plan is compared with ``fairkv``
  at one copy per layer, the launcher's default). 1.0: re-planning buys nothing.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .cost import CostModel, default_cost_model
from .metrics import evaluate
from .schema import Plan
from .stats import KVStats


def layer_shares(kv_len: np.ndarray) -> np.ndarray:
    """float64 ``[L, KV]``: each layer's kept tokens as shares of the layer (rows sum to 1; a layer
    with no tokens counts as an even split)."""
    w = np.asarray(kv_len, dtype=np.float64)
    tot = w.sum(axis=1, keepdims=True)
    even = np.full_like(w, 1.0 / w.shape[1])
    return np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), even)


def share_drift(live: np.ndarray, source: np.ndarray) -> tuple[float, float, np.ndarray]:
    """``(mean, max, per layer [L])`` total-variation distance of the per-layer head shares of ``live`` and
    ``source`` (both ``[L, KV]`` kept tokens per head); the mean is weighted by the live tokens per layer."""
    live, source = np.asarray(live, dtype=np.float64), np.asarray(source, dtype=np.float64)
    if live.shape != source.shape:
        raise ValueError(f"live stats are {live.shape}, the plan's source {source.shape}")
    tv = 0.5 * np.abs(layer_shares(live) - layer_shares(source)).sum(axis=1)
    weight = live.sum(axis=1)
    mean = float((tv * weight).sum() / weight.sum()) if weight.sum() > 0 else float(tv.mean())
    return mean, float(tv.max(initial=0.0)), tv


def planning_cost(plan: Plan, group_size: int, hidden: int) -> CostModel:
    """The cost model to judge ``plan`` with: its own, except a ``sha`` plan (made from the shape alone,
    it carries a placeholder) which gets the default calibrated for the model shape."""
    cm = plan.cost_model
    if plan.strategy == "sha":
        return default_cost_model(group_size, hidden)
    return CostModel(c_head=float(cm["c_head"]), c_token=float(cm["c_token"]))


def live_stats(plan: Plan, live_mean: np.ndarray, *, num_q_heads: int, head_dim: int,
               hidden: int | None = None) -> tuple[KVStats, CostModel]:
    """The live means (``[L, KV]``) as stats of the plan's model, and the cost model to plan them with."""
    stats = KVStats(model=plan.model, num_layers=plan.num_layers, num_q_heads=num_q_heads,
                    num_kv_heads=plan.num_kv_heads, head_dim=head_dim,
                    kv_len_mean=np.asarray(live_mean, dtype=np.float64), hidden_size=hidden)
    return stats, planning_cost(plan, stats.group_size, stats.hidden)


def fresh_plan(plan: Plan, live_mean: np.ndarray, *, num_q_heads: int, head_dim: int, strategy: str,
               max_copies_per_layer: int, hidden: int | None = None, balance_memory: bool = True) -> Plan:
    """A plan for the live means with ``strategy`` (what a re-plan from the served traffic switches to)."""
    from .planner import build_plan

    stats, cost = live_stats(plan, live_mean, num_q_heads=num_q_heads, head_dim=head_dim, hidden=hidden)
    return build_plan(stats, plan.tp, strategy, cost=cost, max_copies_per_layer=max_copies_per_layer,
                      balance_memory=balance_memory)[0]


def fresh_strategy(plan: Plan) -> tuple[str, int]:
    """The strategy and copy limit a re-plan of ``plan`` is priced with: its own (its copy limit, one by
    default), ``fairkv`` at one copy per layer for ``sha`` (the launcher's default)."""
    strategy = "fairkv" if plan.strategy == "sha" else plan.strategy
    return strategy, int(plan.cost_model.get("max_copies_per_layer") or 1) if strategy == "fairkv" else 0


def replan_gain(plan: Plan, live_mean: np.ndarray, *, num_q_heads: int, head_dim: int,
                hidden: int | None = None) -> dict:
    """The cost-model gain of re-planning on ``live_mean`` (``[L, KV]`` mean kept tokens per request).

    Returns ``{"gain", "running_attention_time", "fresh_attention_time", "running_attention_busy_rate",
    "fresh_attention_busy_rate", "fresh_strategy", "fresh_copies"}`` (busy rates: the paper's per-layer GPU busy
    rate under the cost model)."""
    from .planner import build_plan

    stats, cost = live_stats(plan, live_mean, num_q_heads=num_q_heads, head_dim=head_dim, hidden=hidden)
    running = evaluate(replace(plan, cost_model={**plan.cost_model, **cost.to_json()}), stats)
    strategy, copies = fresh_strategy(plan)
    fresh, _ = build_plan(stats, plan.tp, strategy, cost=cost, max_copies_per_layer=copies,
                          balance_memory=False)
    f = fresh.predicted
    t_run, t_new = running["attention_time"], f["attention_time"]
    return {"gain": t_run / t_new if t_new > 0 else 1.0, "running_attention_time": t_run,
            "fresh_attention_time": t_new, "running_attention_busy_rate": running["attention_busy_rate"],
            "fresh_attention_busy_rate": f["attention_busy_rate"], "fresh_strategy": strategy, "fresh_copies": f["copies"]}


def drift_report(plan: Plan, live_mean: np.ndarray, samples: int, *, num_q_heads: int, head_dim: int,
                 hidden: int | None = None) -> dict:
    """What the server reports: the share drift against the plan's ``source`` (None without one) and
    the re-plan gain on the live means, with the number of prompts they come from."""
    src = plan.source_kv_len_mean()
    out: dict = {"samples": int(samples), "source_samples": plan.source.get("samples"),
                 "share_drift": None, "share_drift_max": None, "share_drift_per_layer": None}
    if src is not None:
        mean, mx, per_layer = share_drift(live_mean, src)
        out.update(share_drift=round(mean, 6), share_drift_max=round(mx, 6),
                   share_drift_per_layer=per_layer.round(4).tolist())
    g = replan_gain(plan, live_mean, num_q_heads=num_q_heads, head_dim=head_dim, hidden=hidden)
    out.update(replan_gain=round(g["gain"], 6), replan={k: (round(v, 6) if isinstance(v, float) else v)
                                                          for k, v in g.items()})
    return out
