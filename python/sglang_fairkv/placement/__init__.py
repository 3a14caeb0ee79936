"""FairKV placement: per-head KV statistics -> head placement plan (pure Python/numpy).

``build_plan(stats, tp, strategy)`` is the entry point; see ``README.md`` here for the formulation,
the proof sketch behind the exact solver and a worked example.
"""

from .cost import CostModel, default_cost_model
from .metrics import copy_weight_bytes, evaluate
from .planner import allocate_copies, build_plan
from .replicas import ReplicaAssigner
from .schema import Plan, PlanError, load_plan, plan_from_json
from .solver import LayerSolution, sha_layer, solve_layer
from .stats import KVStats, StatsError, load_stats, stats_from_json, synthetic_stats

__all__ = [
    "CostModel", "default_cost_model", "copy_weight_bytes", "evaluate", "allocate_copies",
    "build_plan", "ReplicaAssigner", "Plan", "PlanError", "load_plan", "plan_from_json", "LayerSolution",
    "sha_layer", "solve_layer", "KVStats", "StatsError", "load_stats", "stats_from_json",
    "synthetic_stats",
]
