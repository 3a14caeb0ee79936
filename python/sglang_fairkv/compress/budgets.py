"""Which positions each KV head keeps, given scores: uniform (SnapKV), AdaKV, PyramidKV, HeadKV.

All functions take ``scores`` float32 ``[num_kv_heads, seq_len]`` of one layer and return the kept
positions per head as a list of sorted int64 tensors. Semantics follow kvpress 0.5.5
(``ScorerPress``, ``AdaKVPress``, ``PyramidKVPress``) where kvpress has the method.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def n_kept_for_ratio(seq_len: int, ratio: float) -> int:
    """Tokens kept per head on average for kvpress's ``compression_ratio`` (fraction removed)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"compression ratio must be in [0, 1), got {ratio}")
    return max(1, int(seq_len * (1 - ratio)))


def n_kept_for_budget(seq_len: int, budget: int) -> int:
    """Tokens kept per head on average for a budget in tokens (prompts shorter are kept whole)."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    return min(seq_len, budget)


def _sorted_rows(idx: torch.Tensor) -> list[torch.Tensor]:
    """Each row of ``idx`` [H, n] sorted, as views of one sort (one op, not one per head)."""
    return list(idx.sort(dim=-1).values.unbind(0))


def select_uniform(scores: torch.Tensor, n_kept: int) -> list[torch.Tensor]:
    """Each head keeps its own top ``n_kept`` positions (SnapKV)."""
    n_kept = min(n_kept, scores.shape[-1])
    return _sorted_rows(scores.topk(n_kept, dim=-1).indices)


def adakv_floor(n_kept: int, alpha: float) -> int:
    """AdaKV's safeguard (kvpress ``AdaKVPress``): rows each head keeps first, ``int(n_kept * alpha)``, at least
    1 when ``alpha > 0`` and anything is kept."""
    n_safe = int(n_kept * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe) if n_kept > 0 else 0
    return n_safe


def select_adakv(scores: torch.Tensor, n_kept: int, alpha: float = 0.2) -> list[torch.Tensor]:
    """AdaKV (Feng et al. 2024, arXiv 2407.11550): the layer keeps ``H * n_kept`` positions in total.

    Each head first protects its top ``int(n_kept * alpha)`` (at least 1 when ``alpha > 0``); then the
    ``H * (S - n_kept)`` lowest scores across all heads of the layer are pruned.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, s = scores.shape
    n_kept = min(n_kept, s)
    n_safe = adakv_floor(n_kept, alpha)
    scores = scores.clone()
    top = torch.topk(scores, n_safe, dim=-1).indices
    scores.scatter_(-1, top, torch.finfo(scores.dtype).max)
    n_pruned = h * (s - n_kept)
    keep = torch.ones(h * s, dtype=torch.bool, device=scores.device)
    pruned = torch.topk(-scores.reshape(-1), n_pruned).indices
    keep[pruned] = False
    keep = keep.view(h, s)
    # How many each head keeps is data-dependent and the host must know it (pages are allocated on the
    # host): one read-back of the H counts; the kept positions of every head then come from one stable
    # sort (kept positions first, ascending), sliced on the host. No nonzero per head.
    counts = keep.sum(dim=-1).tolist()
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    return [order[i, :c] for i, c in enumerate(counts)]


def pyramid_layer_budget(layer: int, num_layers: int, seq_len: int, ratio: float, window: int = 64,
                         beta: int = 20) -> int:
    """PyramidKV's per-layer token budget for kvpress's ``compression_ratio`` (kvpress 0.5.5 formula).

    Lower layers keep more, upper layers less; the mean over layers matches the ratio.
    """
    if beta < 1:
        raise ValueError(f"beta must be >= 1, got {beta}")
    max_capacity = window + seq_len * (1 - ratio)
    min_num = (max_capacity - window) / beta
    max_num = (max_capacity - window) * 2 - min_num
    if max_num >= seq_len - window:
        max_num = seq_len - window
        min_num = (max_capacity - window) * 2 - max_num
    if not (seq_len >= max_num >= min_num >= window):
        return max(1, round(seq_len * (1 - ratio)))  # kvpress falls back to SnapKV's budget
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
    return round(max_num - layer * steps)


def load_head_budgets(path: str | Path, num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """HeadKV-style static budgets: JSON ``{"head_budgets": [[layers][kv_heads]] tokens}``.

    Returns int64 ``[num_layers, num_kv_heads]``; raises ValueError naming a bad shape or value.
    """
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read head budgets {path}: {e}") from e
    b = d.get("head_budgets") if isinstance(d, dict) else None
    if not isinstance(b, list) or len(b) != num_layers or any(
            not isinstance(r, list) or len(r) != num_kv_heads for r in b):
        raise ValueError(f"head_budgets must be a [{num_layers}][{num_kv_heads}] list of token counts")
    t = torch.tensor(b, dtype=torch.int64)
    if (t < 1).any():
        raise ValueError("head budgets must be >= 1 token")
    return t


def select_per_head(scores: torch.Tensor, budgets: torch.Tensor) -> list[torch.Tensor]:
    """Head ``i`` keeps its top ``budgets[i]`` positions (HeadKV static budgets, PyramidKV layers)."""
    s = scores.shape[-1]
    ks = [min(int(k), s) for k in (budgets.tolist() if isinstance(budgets, torch.Tensor) else budgets)]
    return [scores[i].topk(k).indices.sort().values for i, k in enumerate(ks)]
