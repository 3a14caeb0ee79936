"""What a fairkv scheduler reports: the ``/server_info`` dict, the per-rank log line, the live profile
and the plan-drift report, all read from one :class:`~sglang_fairkv.serving.state.FairKVState`.

Host work only, run where SGLang asks for it (``/server_info``, the log cadence, ``log_stats``), never in
a forward. The balances are named for what they measure (:mod:`~sglang_fairkv.placement.balance`):
``memory_busy_rate`` (KV rows per rank over all layers) and ``attention_busy_rate`` (per layer, the rows
each rank reads in a decode step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: ``/server_info`` keys kept for older clients: alias -> the key it repeats
ALIASES = {"busy_rate": "memory_busy_rate"}


@dataclass
class UsageLog:
    """Rate limit of the per-rank KV log line (rank 0, while requests arrive)."""

    interval_s: float = 10.0
    last: float = -np.inf


def live_profile(state) -> dict | None:
    """The live profile with what makes it a ``fairkv-stats/1`` file (model shape, method, budget), None
    before any compressed prompt."""
    prof = state.traffic.profile()
    if prof is None:
        return None
    plan, cfg = state.rank_plan.plan, state.cfg
    return {**prof, "model": plan.model, "num_layers": plan.num_layers, "num_kv_heads": plan.num_kv_heads,
            "num_q_heads": state.rank_plan.num_q_heads, "head_dim": state.pool.head_dim,
            "method": cfg.method, "budget": cfg.budget, "ratio": cfg.ratio,
            # with decode-time compression the samples include each decode compression's kept sizes
            "decode_method": cfg.decode_method if cfg.decode_enabled else None,
            "decode_budget": cfg.decode_budget if cfg.decode_enabled else None}


def plan_drift(state) -> dict | None:
    """The plan-drift report (:mod:`~sglang_fairkv.placement.drift`) on the live traffic; rank 0 of a TP
    group only (the planner runs on the host), None elsewhere, at TP 1 (nothing to balance) or before a
    compressed prompt."""
    rp = state.rank_plan
    if rp.rank != 0 or rp.tp == 1:
        return None
    return state.traffic.drift(rp.plan, num_q_heads=rp.num_q_heads, head_dim=state.pool.head_dim)


def decode_compress_stats(state) -> dict | None:
    """Decode-time compression (``--kv-decode-compress``): the settings, what it did since start (passes,
    request compressions, rows evicted group-wide) and for the requests admitted now; None when off."""
    cfg = state.cfg
    if not cfg.decode_enabled:
        return None
    reqs = state.requests
    admitted = reqs.admitted_indices()
    ring = state.decode_ring
    return {"method": cfg.decode_method, "budget": cfg.decode_budget, "interval": cfg.decode_interval,
            "window": cfg.decode_window, **state.decode_stats,
            "running_rows_evicted": int(reqs.decode_evicted[admitted].sum()),
            "running_compressed_requests": int((reqs.decode_compressions[admitted] > 0).sum()),
            "query_ring_bytes": 0 if ring is None else ring.numel() * ring.element_size()}


def fairkv_stats(state) -> dict:
    """``/server_info`` -> ``internal_states[i]["fairkv"]``: this rank's pool, the TP group's pages and
    balances from the ledger (identical on every rank), the live traffic and the plan's drift."""
    p, lg, reqs = state.pool, state.ledger, state.requests
    # pages of the requests' segments (the dense prefix tier's cached pages are reported apart: a
    # cache, evicted before any request waits)
    used_rows, used_pages = p.used_tokens(), p.segment_pages()
    rows, pages = lg.rows_used(), lg.segment_pages_used()
    tier_pages = lg.tier_pages()
    tree = state.tree
    rpt = lg.rows_per_token.clamp_min(1)
    loads = lg.layer_loads()
    kept, transient = state.kept_and_transient_rows()
    admitted = reqs.admitted_indices()
    out = {
        "kv_compress": state.cfg.method,
        "kv_dtype": str(p.dtype).removeprefix("torch."),  # the rows' (fp8 with --kv-cache-dtype fp8_*)
        # what the pool means: the compression in words, pages of a 1000 + 256-token request compressed vs
        # dense (stock), and how many such requests fit at once each way (start-up line)
        "capacity": state.capacity,
        "plan": state.rank_plan.plan.strategy,
        "plan_epoch": int(state.plan_epoch),  # switches so far (GET /fairkv/plan has the plan and its hash)
        # switches (automatic ones apart), the last one (mode, pause, what moved), bytes moved since start
        "replan": {k: v for k, v in state.replan_log.items() if not k.endswith("_at")},  # (monotonic clocks)
        "tp_rank": state.rank_plan.rank,
        "dp_rank": state.dp_rank or 0,
        "page_size": p.page_size,
        "pages_total": p.usable_pages,
        "pages_used": used_pages,
        "rows_in_segments": used_rows,
        "token_equivalents_in_use": used_rows / max(1, state.rows_per_token),
        "pool_bytes_in_use": used_pages * p.page_size * p.bytes_per_row(),
        "requests_with_segments": p.requests_holding(),
        "page_table_bytes": p.table_bytes(max_reqs=p.max_reqs, num_layers=p.num_layers,
                                          num_kv_heads=p.num_kv_heads, max_context=p.max_context,
                                          page_size=p.page_size),
        "decode_host_index_readbacks": state.host_index_readbacks,
        "requests_admitted": len(reqs.admitted),
        # rows of compressed requests vs dense prefill rows awaiting their prompt's last chunk
        "kept_rows": kept.tolist(),
        "transient_rows": transient.tolist(),
        "requests_in_prefill": int((~reqs.prompt_done[admitted]).sum()),
        "admissible_when_empty": state.admissible_when_empty(),
        "peak_pages_used": p.peak_used,
        "ledger_matches_pool": state.ledger_mismatch() is None,
        # the dense prefix tier (prefix caching): pages it holds here, the tree's tokens, counters
        "prefix_tier": None if state.tier is None else {
            "pages": p.tier_used_pages, "blocks": lg.tier_blocks, "blocks_total": state.tier.num_blocks,
            "cap_pages": None if state.tier_cap_pages is None else int(state.tier_cap_pages[state.rank_plan.rank]),
            "cached_tokens": 0 if tree is None else int(tree.evictable_size() + tree.protected_size()),
            "locked_tokens": 0 if tree is None else int(tree.protected_size()),
            **state.tier_stats},
        # the whole TP group, from the ledger (identical on every rank)
        "ranks": [{"rank": q, "rows_in_use": int(rows[q]), "pages_used": int(pages[q]),
                   "prefix_tier_pages": int(tier_pages[q]),
                   "pages_total": int(lg.usable[q]),
                   "token_equivalents_in_use": float(rows[q] / rpt[q])} for q in range(lg.tp)],
        "memory_busy_rate": lg.memory_busy_rate(),
        # per-layer attention balance: each rank's rows read per layer in a decode step of the requests held
        "attention_busy_rate": lg.attention_busy_rate(loads),
        "layer_balance": [round(x, 4) for x in lg.layer_balance(loads).tolist()],
        "layer_loads": loads.tolist(),
        # the served traffic (sampled decode steps; compressed prompts), and the plan against it
        "attention_busy_rate_since_start": state.traffic.attention_busy_rate_since_start(),
        "layer_balance_since_start": state.traffic.layer_balance_since_start(),
        "balance_samples": state.traffic.balance_samples,
        "live_profile": live_profile(state),
        "plan_drift": plan_drift(state),
        "plan_has_source": bool(state.rank_plan.plan.source),
        "group_token_capacity": lg.capacity_when_empty(),
        "plan_copies_per_layer": state.rank_plan.plan.copies_per_layer(),
        "replicas": state.assigner.served(),
        "roomiest_admissions": state.roomiest_admissions,
        "decode_compress": decode_compress_stats(state),
    }
    for alias, key in ALIASES.items():
        out[alias] = out[key]
    return out


def maybe_log_group_usage(state, now: float | None = None) -> bool:
    """Rank 0, at most every ``state.usage_log.interval_s``: one line of KV rows in use per rank and the
    balances. Returns whether it logged."""
    now = time.monotonic() if now is None else now
    ul = state.usage_log
    if state.rank_plan.rank != 0 or now - ul.last < ul.interval_s:
        return False
    ul.last = now
    lg, tr = state.ledger, state.traffic
    loads = lg.layer_loads()
    kept, transient = state.kept_and_transient_rows()
    drift, since = plan_drift(state), tr.attention_busy_rate_since_start()
    logger.info("sglang-fairkv %sKV per rank: rows %s (kept %s, transient prefill %s), pages %s of %s, memory "
                "busy rate %.3f, attention busy rate %.3f (per layer, min %.3f; since start %s), %d "
                "requests, the empty pool would admit %s at this mix (plan %s; share drift %s, re-plan "
                "gain %s over %d prompts)", f"DP replica {state.dp_rank} " if state.dp_rank is not None else "",
                lg.rows_used().tolist(), kept.tolist(),
                transient.tolist(), lg.pages_used().tolist(), lg.usable.tolist(), lg.memory_busy_rate(),
                lg.attention_busy_rate(loads), float(lg.layer_balance(loads).min()),
                "-" if since is None else f"{since:.3f}", len(state.requests.admitted),
                state.admissible_when_empty(), state.rank_plan.plan.strategy,
                "-" if drift is None or drift["share_drift"] is None else f"{drift['share_drift']:.3f}",
                "-" if drift is None else f"{drift['replan_gain']:.3f}", min(tr.seen, tr.window))
    return True
