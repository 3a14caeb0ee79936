"""What a request will hold after compression, known before it runs (pure functions, host numpy).

Admission charges a request what it will keep, not its dense prompt. The budget rule of
:func:`~sglang_fairkv.compress.policy.kept_for_layer` fixes the kept count of every (layer, KV head)
from the prompt length alone for SnapKV, PyramidKV, HeadKV and ``none``; AdaKV fixes each layer's total
(``KV * n_kept``) and a per-head floor (the ``alpha`` safeguard), the split between heads being data
dependent. So at TP 1 the kept *rows* are exact for every method; per TP rank (a subset of a layer's
heads) AdaKV gives a bound: the rank's heads take at most the layer total minus the other heads'
floors, and at most the whole prompt each.

Pages: a segment of ``k`` rows takes ``ceil(k / P)`` pages. For AdaKV's bound the page rounding is
bounded too (``s`` heads of ``R`` rows in all take at most ``(R + s (P - 1)) // P`` pages).
"""

from __future__ import annotations

import numpy as np
import torch

from .budgets import adakv_floor, pyramid_layer_budget
from .policy import CompressConfig


def compresses(cfg: CompressConfig, seq_len: int) -> bool:
    """Whether a prompt of ``seq_len`` tokens may be compressed in some layer (else it keeps all)."""
    if not cfg.enabled or seq_len <= cfg.window:
        return False
    return cfg.method == "headkv" or cfg.n_kept(seq_len) < seq_len


def kept_per_head(cfg: CompressConfig, seq_len: int, num_layers: int, num_kv_heads: int,
                  head_budgets: torch.Tensor | None = None) -> np.ndarray | None:
    """int64 ``[L, KV]``: rows each segment keeps after compressing a ``seq_len``-token prompt, exactly as
    :func:`kept_for_layer` decides; None for AdaKV (data-dependent split, see :func:`adakv_layer_rule`)."""
    n = seq_len
    shape = (num_layers, num_kv_heads)
    if not compresses(cfg, n):
        return np.full(shape, n, dtype=np.int64)
    n_kept = cfg.n_kept(n)
    if cfg.method == "snapkv":
        return np.full(shape, min(n_kept, n), dtype=np.int64)
    if cfg.method == "adakv":
        return None
    if cfg.method == "pyramidkv":
        eff = cfg.pyramid_ratio(n)
        per_layer = [min(n, pyramid_layer_budget(l, num_layers, n, eff, cfg.window)) for l in range(num_layers)]
        return np.repeat(np.asarray(per_layer, dtype=np.int64)[:, None], num_kv_heads, axis=1)
    if head_budgets is None:
        raise ValueError("headkv needs the per-head budgets tensor")
    return np.minimum(np.asarray(head_budgets, dtype=np.int64), n)


def adakv_layer_rule(cfg: CompressConfig, seq_len: int, num_kv_heads: int) -> tuple[int, int]:
    """AdaKV for a compressed ``seq_len``-token prompt: ``(rows the layer keeps in all, floor per head)``."""
    n_kept = min(cfg.n_kept(seq_len), seq_len)
    return num_kv_heads * n_kept, adakv_floor(n_kept, cfg.alpha)


def _per_rank_layer(values: np.ndarray | int, own: np.ndarray, tp: int) -> np.ndarray:
    """int64 ``[tp, L]``: ``values`` (``[L, KV]`` or a scalar per segment) summed per holding rank and
    layer over the held segments of ``own`` (int ``[L, KV]``, -1 not held)."""
    out = np.zeros((tp, own.shape[0]), dtype=np.int64)
    held = own >= 0
    layer = np.broadcast_to(np.arange(own.shape[0])[:, None], own.shape)
    np.add.at(out, (own[held], layer[held]), np.broadcast_to(values, own.shape)[held])
    return out


def kept_pages(cfg: CompressConfig, seq_len: int, extra: int, owner: np.ndarray | torch.Tensor, tp: int,
               page_size: int, head_budgets: torch.Tensor | None = None) -> np.ndarray:
    """int64 ``[tp, L]``: pages each rank holds per layer for one request once its ``seq_len``-token prompt
    is compressed and ``extra`` more tokens are appended (its decode), its segments held as ``owner``
    says (int ``[L, KV]``: the rank of each, -1 not held). Exact except AdaKV (an upper bound per rank;
    exact rows at TP 1, pages up to the rounding of each head). With decode-time compression the decode
    rows are bounded (:func:`decode_bound_pages`): a long generation is charged its bounded size."""
    own = np.asarray(owner, dtype=np.int64)
    full = _prefill_kept_pages(cfg, seq_len, extra, own, tp, page_size, head_budgets)
    if not cfg.decode_enabled or extra <= cfg.decode_interval:
        return full
    first = _prefill_kept_pages(cfg, seq_len, cfg.decode_interval, own, tp, page_size, head_budgets)
    return np.minimum(full, np.maximum(first, decode_bound_pages(cfg, own, tp, page_size)))


def decode_bound_pages(cfg: CompressConfig, owner: np.ndarray, tp: int, page_size: int) -> np.ndarray:
    """int64 ``[tp, L]``: the most pages a request's segments hold on each rank once decode-time
    compression has run (``--kv-decode-compress``): each compression leaves at most ``T`` rows per head
    (SnapKV) or ``KV x T`` per layer (AdaKV, split by score: a rank's heads take at most that minus the
    other heads' floors, each of which keeps ``min(int(T x alpha), K)`` rows -- every head has the
    interval's ``K`` new rows when it is scored), and ``K`` rows per head come before the next one.
    Before the first decode compression the request holds its prefill-kept rows plus ``K``
    (:func:`kept_pages` takes the larger of the two, capped by the uncompressed growth)."""
    own = np.asarray(owner, dtype=np.int64)
    T, K, P = cfg.decode_budget, cfg.decode_interval, page_size
    if cfg.decode_method == "snapkv":
        return _per_rank_layer(-(-(T + K) // P), own, tp)
    kv = own.shape[1]
    segs = _per_rank_layer(1, own, tp)
    rows = np.maximum(0, kv * T - (kv - segs) * _decode_floor(cfg)) + segs * K
    return np.where(segs > 0, (rows + segs * (P - 1)) // P, 0)


def _decode_floor(cfg: CompressConfig) -> int:
    """Rows every head keeps at least after a decode-time AdaKV compression: its floor, or all its rows --
    at least the interval's ``K`` new ones -- when it has fewer."""
    return min(adakv_floor(cfg.decode_budget, cfg.alpha), cfg.decode_interval)


def decode_growth_bound(cfg: CompressConfig, rows: np.ndarray) -> np.ndarray:
    """int64 ``[R]``: rows any segment of each running request (``rows`` ``[R, L, KV]``) may still gain with
    decode-time compression on (a live re-plan prices the decode still owed with it): at most ``K`` before its
    next compression, after which a head holds at most ``T`` (SnapKV) or the layer's ``KV x T`` less the other
    heads' floors (AdaKV, :func:`decode_bound_pages`' rule for one segment), plus ``K`` again."""
    K, T, kv = cfg.decode_interval, cfg.decode_budget, rows.shape[2]
    head_max = T if cfg.decode_method == "snapkv" else kv * T - (kv - 1) * _decode_floor(cfg)
    least = rows.reshape(rows.shape[0], -1).min(axis=1) if rows.size else np.zeros(0, dtype=np.int64)
    return np.maximum(K, head_max + K - least)


def _prefill_kept_pages(cfg: CompressConfig, seq_len: int, extra: int, own: np.ndarray, tp: int,
                        page_size: int, head_budgets: torch.Tensor | None) -> np.ndarray:
    """:func:`kept_pages` without decode-time compression."""
    num_layers, kv = own.shape
    P = page_size
    kept = kept_per_head(cfg, seq_len, num_layers, kv, head_budgets)
    if kept is not None:
        return _per_rank_layer(-(-(kept + extra) // P), own, tp)
    total, floor = adakv_layer_rule(cfg, seq_len, kv)
    segs = _per_rank_layer(1, own, tp)
    rows = np.minimum(segs * seq_len, np.maximum(0, total - (kv - segs) * floor))  # kept rows, bound
    by_rounding = (rows + segs * extra + segs * (P - 1)) // P
    return np.minimum(segs * (-(-(seq_len + extra) // P)), by_rounding)


def dense_pages(seq_len: int, owner: np.ndarray | torch.Tensor, tp: int, page_size: int) -> np.ndarray:
    """int64 ``[tp, L]``: pages each rank holds per layer for one request's uncompressed ``seq_len`` tokens."""
    return _per_rank_layer(-(-seq_len // page_size), np.asarray(owner, dtype=np.int64), tp)


def last_chunk_peak(kept: np.ndarray, dense_full: np.ndarray, dense_prefix: np.ndarray) -> np.ndarray:
    """int64 ``[tp]``: the most pages a request holds on each rank during the forward of its prompt's last
    chunk, compressing as it goes (``[tp, L]`` inputs: kept pages per layer, pages of the whole prompt
    dense, pages of the prefix held before this chunk). While layer ``l`` runs, layers before it are
    compressed, layer ``l`` holds the whole prompt and later layers still hold only the prefix:
    ``sum(kept[:l]) + dense_full[l] + sum(dense_prefix[l+1:])``; the peak is the max over ``l`` (and is
    at least the kept total the forward ends with)."""
    before = np.cumsum(kept, axis=1) - kept
    after = dense_prefix[:, ::-1].cumsum(axis=1)[:, ::-1] - dense_prefix
    return np.maximum((before + dense_full + after).max(axis=1, initial=0), kept.sum(axis=1))


def capacity_summary(cfg: CompressConfig, owner: np.ndarray, usable_pages: np.ndarray, page_size: int,
                     prompt_len: int = 1000, output_len: int = 256,
                     head_budgets: torch.Tensor | None = None) -> dict:
    """What the pool means in requests, for the start-up lines: pages one request of ``prompt_len`` prompt
    and ``output_len`` output tokens holds per rank, compressed (this config) and dense (stock: every head
    keeps every token), and how many such requests fit at once on the tightest rank. ``owner`` int
    ``[L, KV]`` the rank of each segment (copies: the first replica), ``usable_pages`` int ``[tp]``. A
    request that holds nothing fits 0 times (no division by zero)."""
    own = np.asarray(owner, dtype=np.int64)
    tp = len(usable_pages)
    usable = np.asarray(usable_pages, dtype=np.int64)
    kept = kept_pages(cfg, prompt_len, output_len, own, tp, page_size, head_budgets).sum(axis=1)  # [tp]
    dense = dense_pages(prompt_len + output_len, own, tp, page_size).sum(axis=1)
    fits = lambda per: int(min((u // p for u, p in zip(usable, per) if p > 0), default=0))  # noqa: E731
    return {"prompt_len": prompt_len, "output_len": output_len, "pages_compressed": int(kept.max()),
            "pages_dense": int(dense.max()), "requests_compressed": fits(kept), "requests_dense": fits(dense),
            "dense_tokens": int(min(usable[q] * page_size // max(1, int((own == q).sum())) for q in range(tp)))}


def describe(cfg: CompressConfig) -> str:
    """The compression config in plain words (start-up lines)."""
    return _describe_prefill(cfg) + _describe_decode(cfg)


def _describe_prefill(cfg: CompressConfig) -> str:
    if not cfg.enabled:
        return ("no prompt compression" if cfg.decode_enabled
                else "no compression (the ragged per-head pool keeps every token)")
    share = (f"{1 - cfg.ratio:.0%} of each prompt's tokens" if cfg.ratio is not None
             else f"{cfg.budget} tokens of each prompt" if cfg.budget is not None else "its budgets")
    what = {"snapkv": f"every KV head keeps {share} (SnapKV scores)",
            "adakv": f"each layer keeps {share}, split across its KV heads by score (AdaKV)",
            "pyramidkv": f"layers keep a pyramid of budgets averaging {share} (PyramidKV)",
            "headkv": "each KV head keeps its static budget from --kv-head-budgets (HeadKV)"}[cfg.method]
    return (f"{what}; the last {cfg.window} prompt tokens are always kept and prompts of at most {cfg.window} "
            "tokens are kept whole")


def _describe_decode(cfg: CompressConfig) -> str:
    if not cfg.decode_enabled:
        return ""
    T, K, W = cfg.decode_budget, cfg.decode_interval, cfg.decode_window
    who = ("every KV head keeps" if cfg.decode_method == "snapkv"
           else "each layer keeps on average per KV head, split by score,")
    return (f"; while decoding, every {K} steps {who} {T} tokens of prompt + answer (SnapKV scores of the last "
            f"{W} decode queries{', AdaKV split' if cfg.decode_method == 'adakv' else ''}): a request holds at "
            f"most about {T} + {K} rows per head however long it generates")
