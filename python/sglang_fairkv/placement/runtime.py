"""A plan as one TP rank serves it: which KV heads (with their query heads) each layer holds here.

Pure (no SGLang, no torch.distributed): the model classes, the ragged pool and the scheduler hooks all
read this one object. ``local_heads[l]`` is sorted by global KV head id; local KV head ``j`` of layer
``l`` is global head ``local_heads[l][j]`` and owns query heads ``g * G .. g * G + G - 1`` of it
(``G`` = query heads per KV head), in that order -- the row order of the rank's q/k/v weight slices,
of its attention heads and of its o_proj input columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .schema import Plan, PlanError, load_plan
from .solver import sha_layer


@dataclass(frozen=True)
class RankPlan:
    """One rank's view of a plan. ``rows_per_token()[q]``: KV rows rank ``q`` holds per prompt token
    for a request all of whose copied heads it serves (replicas counted whole);
    ``expected_rows_per_token()[q]``: the same with each replica counted at its share (what a typical
    request costs there once Fair-Copying splits the requests)."""

    plan: Plan
    rank: int
    num_q_heads: int

    @property
    def tp(self) -> int:
        return self.plan.tp

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.plan.num_kv_heads

    @property
    def local_heads(self) -> list[list[int]]:
        return [self.plan.heads_on_rank(l, self.rank) for l in range(self.plan.num_layers)]

    def heads_per_layer(self, rank: int | None = None) -> list[int]:
        r = self.rank if rank is None else rank
        return [len(self.plan.heads_on_rank(l, r)) for l in range(self.plan.num_layers)]

    @property
    def max_local_heads(self) -> int:
        return max(self.heads_per_layer())

    def rows_per_token(self) -> np.ndarray:
        return np.array([sum(self.heads_per_layer(q)) for q in range(self.tp)], dtype=np.int64)

    def expected_rows_per_token(self) -> np.ndarray:
        """float64 ``[tp]``: sum over layers and KV heads of the share rank ``q`` serves (1 if alone)."""
        out = np.zeros(self.tp)
        for layer in self.plan.layers:
            for reps in layer:
                for r, share in reps:
                    out[r] += share
        return out

    def local_index(self) -> np.ndarray:
        """int64 ``[layers, kv_heads]``: local slot of each global head on this rank, -1 if absent."""
        out = np.full((self.plan.num_layers, self.plan.num_kv_heads), -1, dtype=np.int64)
        for l, heads in enumerate(self.local_heads):
            out[l, heads] = np.arange(len(heads))
        return out


def sha_plan(model: str, num_layers: int, num_kv_heads: int, num_q_heads: int, tp: int) -> Plan:
    """Standard TP as a plan: contiguous KV heads in every layer, as even as the count allows
    (:func:`~sglang_fairkv.placement.solver.sha_layer`: 3 heads at TP 2 are 2 + 1)."""
    w = np.ones(num_kv_heads)
    try:
        layer = sha_layer(w, tp, 0.0).replicas
    except ValueError as e:
        raise PlanError(str(e)) from None
    return Plan(model=model, tp=tp, num_kv_heads=num_kv_heads, strategy="sha",
                cost_model={"c_head": 0.0, "c_token": 1.0}, layers=[list(layer) for _ in range(num_layers)],
                num_q_heads=num_q_heads)


def resolve_plan(spec: str, *, model: str, num_layers: int, num_kv_heads: int, num_q_heads: int, tp: int,
                 stats_path: str | None = None, max_copies_per_layer: int = 1, head_dim: int = 64) -> Plan:
    """``--fairkv-plan`` -> a plan checked against the model and ``tp``; raises :class:`PlanError`.

    ``spec``: a ``fairkv-plan/1`` file, or ``sha`` (shape only), or ``assign`` / ``fairkv`` (computed
    here from the ``fairkv-stats/1`` file ``stats_path``, which must describe this model's shape;
    ``assign`` without stats balances head counts: every head weighs the same, and the ranks' heads
    summed over layers come out even). With ``sha`` or a plan file, ``stats_path`` (optional) becomes
    the plan's ``source``: the stats the server's drift report compares the live traffic with.
    """
    from dataclasses import replace

    if num_q_heads % num_kv_heads:
        raise PlanError(f"model has {num_q_heads} query heads, not a multiple of {num_kv_heads} KV heads")
    stats = _load_stats(stats_path, num_layers, num_kv_heads, num_q_heads) if stats_path else None
    if spec in ("assign", "fairkv"):
        from .planner import build_plan

        if stats is None and spec == "fairkv":
            raise PlanError(f"--fairkv-plan {spec} computes the plan from measured stats: give "
                            "--fairkv-stats FILE (python -m sglang_fairkv.profiler writes one)")
        if max_copies_per_layer < 0:
            raise PlanError(f"--fairkv-max-copies-per-layer must be >= 0, got {max_copies_per_layer}")
        if stats is None:  # assign by head counts: no measured source to drift from
            plan, _ = build_plan(uniform_stats(model, num_layers, num_kv_heads, num_q_heads, head_dim), tp, spec)
            plan = replace(plan, source=None)
        else:
            plan, _ = build_plan(stats, tp, spec, max_copies_per_layer=max_copies_per_layer)
    else:
        if spec == "sha":
            plan = sha_plan(model, num_layers, num_kv_heads, num_q_heads, tp)
        elif Path(spec).is_file():
            plan = load_plan(spec)
        else:
            raise PlanError(f"--fairkv-plan {spec}: not a plan file and not one of sha, assign, fairkv")
        if stats is not None:
            from .planner import stats_source

            plan = replace(plan, source=stats_source(stats))
    plan.check_model(num_layers, num_kv_heads, tp, num_q_heads)
    return plan


def uniform_stats(model: str, num_layers: int, num_kv_heads: int, num_q_heads: int, head_dim: int):
    """Stats in which every KV head of every layer keeps the same tokens (placement by head count)."""
    from .stats import KVStats

    return KVStats(model=model, num_layers=num_layers, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, kv_len_mean=np.ones((num_layers, num_kv_heads)), method="uniform",
                   extra={"source": "uniform head loads (no --fairkv-stats)"})


def stats_mismatch(stats, *, method: str, budget: int | None, ratio: float | None) -> list[str]:
    """Why ``stats`` may not describe a run with ``--kv-compress method`` and this budget (``budget``
    tokens per head, or ``ratio`` removed), as warning texts; empty when they agree. The kept tokens per
    head depend on both, so a plan made from other stats balances another load."""
    out = []
    if stats.method not in (None, method):
        out.append(f"they were measured with {stats.method}, this server runs {method}")
    if budget is not None:
        if stats.budget is None or abs(stats.budget - budget) > 0.1 * budget:
            out.append(f"they were measured at a budget of {stats.budget} tokens per head, this server keeps "
                       f"{budget}")
    elif ratio is not None:
        measured = stats.extra.get("ratio")
        if measured is None and stats.budget and stats.extra.get("prompt_len_mean"):
            measured = 1.0 - stats.budget / float(stats.extra["prompt_len_mean"])
        if measured is None:
            out.append("they do not record the compression ratio they were measured at")
        elif abs(float(measured) - ratio) > 0.05:
            out.append(f"they were measured at --kv-compress-ratio {float(measured):.2f}, this server runs {ratio}")
    return out


def _load_stats(path: str, num_layers: int, num_kv_heads: int, num_q_heads: int):
    """``--fairkv-stats`` read, validated and checked against the model's shape (:class:`PlanError`)."""
    from .stats import StatsError, load_stats

    try:
        stats = load_stats(path)
    except StatsError as e:
        raise PlanError(f"--fairkv-stats {path}: {e}") from None
    if (stats.num_layers, stats.num_kv_heads, stats.num_q_heads) != (num_layers, num_kv_heads, num_q_heads):
        raise PlanError(f"--fairkv-stats {path} describes {stats.num_layers} layers x "
                        f"{stats.num_kv_heads} KV heads ({stats.num_q_heads} query heads), the model has "
                        f"{num_layers} x {num_kv_heads} ({num_q_heads})")
    return stats
