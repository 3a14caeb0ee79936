"""Per-head KV compression: scoring (SnapKV) and budget allocation (uniform, AdaKV, PyramidKV,
HeadKV static). Pure torch, device-agnostic; semantics of NVIDIA kvpress 0.5.5 where it has them.
"""

from .budgets import (load_head_budgets, n_kept_for_budget, n_kept_for_ratio, pyramid_layer_budget,
                      select_adakv, select_per_head, select_uniform)
from .policy import METHODS
from .snapkv import SnapKVScorer

__all__ = ["SnapKVScorer", "METHODS", "load_head_budgets", "n_kept_for_budget", "n_kept_for_ratio",
           "pyramid_layer_budget", "select_adakv", "select_per_head", "select_uniform"]
