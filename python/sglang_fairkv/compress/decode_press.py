"""Decode-time compression of ragged segments: kvpress 0.5.5 ``DecodingPress`` semantics over a batch.

Every ``interval`` decode steps a request's cache is re-scored with SnapKV (the attention of its last
``window`` decode queries, mean over them, ``avg_pool1d``, mean over each GQA group; the window's own rows
always kept) and cut to ``budget`` rows per head (SnapKV) or ``KV x budget`` rows per layer split by score
(AdaKV, with its per-head floor). Unlike the prompt, the segments are ragged by then (an earlier
compression, AdaKV's split), so everything here works on a batch of segments padded to the longest,
each scored over its own rows only -- the same numbers as scoring each segment alone:

* keys ``[n, H, S, D]`` padded per (request, head) to ``S``; ``lens`` int64 ``[n, H]`` the live rows;
* the window's queries are the segment's last ``window`` rows (the decode tokens since the last
  compression: ``interval > window``), causal among themselves;
* padded rows score ``-inf`` (never kept), the window's rows ``2.0`` (above any pooled probability, as
  kvpress's ``max + 1``), the pooling sees zeros past the scored rows (kvpress's zero padding).

Where this departs from kvpress, it is on purpose (a server that frees pages; see docs/DESIGN.md): rows
not kept are evicted (kvpress's AdaKV masks them and re-scores them at the next interval), every
window query carries its own position's RoPE (kvpress applies the current step's to all of them), and
kept rows stay in position order (kvpress's gather follows top-k order, which moves the next
interval's pooling neighbours). Pure torch; no host sync except the AdaKV counts (one read per call).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .budgets import adakv_floor

#: score of the window's rows: above any pooled attention probability (kvpress uses ``max + 1``)
WINDOW_SCORE = 2.0


def window_scores(q_win: torch.Tensor, k: torch.Tensor, lens: torch.Tensor, kernel: int = 5,
                  sm_scale: float | None = None) -> torch.Tensor:
    """SnapKV scores of ragged segments.

    Parameters
    ----------
    q_win : [n, H * G, W, D] post-RoPE queries of each request's last ``W`` decode steps, oldest first,
        the ``G`` query heads of each KV head of ``k`` in order.
    k : [n, H, S, D] post-RoPE keys, segment ``(i, h)`` in rows ``[0, lens[i, h])`` (the rest padding).
    lens : int64 [n, H] (device) live rows per segment, each ``> W``.

    Returns float32 ``[n, H, S]``: pooled window attention for rows ``< lens - W``, ``WINDOW_SCORE`` for the
    window's rows, ``-inf`` for padding.
    """
    n, hq, w, d = q_win.shape
    _, h, s, _ = k.shape
    g = hq // max(1, h)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    logits = torch.matmul(q_win.reshape(n, h, g * w, d), k.transpose(-1, -2)).view(n, h, g, w, s)
    logits.mul_(scale)
    col = torch.arange(s, device=k.device)
    # window query i sits at row lens - W + i: it sees rows <= that (padding is past every query)
    last = lens[:, :, None] - w + torch.arange(w, device=k.device)  # [n, H, W]
    logits.masked_fill_((col > last[..., None])[:, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    del logits
    scored = col < (lens - w)[:, :, None]  # [n, H, S]: the rows kvpress pools (before the window)
    mean = probs.mean(dim=-2).masked_fill_(~scored[:, :, None], 0.0)  # [n, H, G, S]
    del probs
    pooled = F.avg_pool1d(mean.reshape(n * h * g, 1, s), kernel_size=kernel, padding=kernel // 2,
                          stride=1).view(n, h, g, s).mean(2)
    pooled = torch.where(scored, pooled, WINDOW_SCORE)
    return pooled.masked_fill_(col >= lens[:, :, None], float("-inf"))


def select_uniform(scores: torch.Tensor, lens: np.ndarray, budget: int) -> tuple[torch.Tensor, np.ndarray]:
    """SnapKV: each segment keeps its top ``min(budget, len)`` rows.

    ``scores`` float32 [n, H, S] (:func:`window_scores`); ``lens`` host int64 [n, H]. Returns the kept rows
    of each segment ascending, first ``counts[i, h]`` entries valid (int64 ``[n, H, min(budget, S)]``,
    device), and ``counts`` (host, known without reading the device)."""
    s = scores.shape[-1]
    k = min(budget, s)
    top = scores.topk(k, dim=-1).indices  # padding (-inf) only where a segment has fewer than k rows
    top = torch.where(top < torch.as_tensor(lens, device=top.device)[..., None], top, s)
    return top.sort(dim=-1).values, np.minimum(lens, budget)


def select_adakv(scores: torch.Tensor, lens: np.ndarray, budget: int, alpha: float
                 ) -> tuple[torch.Tensor, np.ndarray]:
    """AdaKV over ragged segments: a request whose layer holds more than ``KV x budget`` rows keeps that
    many in all, each head first protecting its top ``min(int(budget x alpha), len)`` (at least 1 when
    ``alpha > 0``), the rest by score across the layer's heads; a request at or under it keeps all.

    ``scores`` float32 [n, KV, S] of *every* head of the layer (under TP: after the exchange); ``lens``
    host int64 [n, KV]. Returns the kept rows of each segment ascending, first ``counts`` valid (int64
    ``[n, KV, S]``), and ``counts`` (host: the one read-back -- pages are taken on the host)."""
    n, kv, s = scores.shape
    dev = scores.device
    live = torch.arange(s, device=dev) < torch.as_tensor(lens, device=dev)[..., None]  # [n, KV, S]
    n_safe = adakv_floor(budget, alpha)
    sc = scores.clone()
    if n_safe:
        top = sc.topk(min(n_safe, s), dim=-1).indices
        picked = sc.gather(-1, top)
        sc.scatter_(-1, top, torch.where(picked > float("-inf"), torch.finfo(sc.dtype).max, picked))
    keep_n = min(kv * budget, kv * s)
    keep = torch.zeros(n, kv * s, dtype=torch.bool, device=dev)
    keep.scatter_(1, sc.reshape(n, kv * s).topk(keep_n, dim=1).indices, True)
    over = torch.as_tensor(lens.sum(axis=1) > kv * budget, device=dev)
    keep = torch.where(over[:, None, None], keep.view(n, kv, s) & live, live)
    counts = keep.sum(dim=-1).cpu().numpy().astype(np.int64)  # the host must know them (its pages)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept rows first, ascending
    return order, counts
