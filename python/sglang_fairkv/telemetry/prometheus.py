"""fairkv gauges in SGLang's Prometheus metrics (``--enable-metrics``; thin adapter).

SGLang's scheduler pushes its gauges in ``SchedulerMetricsCollector.log_stats`` (rank 0 of the TP group,
in the scheduler process, with ``PROMETHEUS_MULTIPROC_DIR`` set); an AFTER hook there calls
:func:`export` with this process's :class:`~sglang_fairkv.serving.state.FairKVState`. The ledger holds
every rank's segments, so rank 0 exports the whole group: per-rank series carry ``tp_rank`` = the rank
the value belongs to (the collector's other labels unchanged), per-layer ones a ``layer`` label. Every
series carries ``dp_rank``: under ``--dp-size N`` each replica's rank 0 exports its own group.

    sglang:fairkv_attention_busy_rate                 per-layer balance of the requests held now
    sglang:fairkv_attention_busy_rate_since_start     the same over the sampled decode steps served
    sglang:fairkv_memory_busy_rate                    KV rows summed over layers, mean / max over ranks
    sglang:fairkv_layer_balance{layer}                per layer, mean / max rank load now
    sglang:fairkv_layer_rows{tp_rank,layer}           KV rows each rank reads in each layer now
    sglang:fairkv_pages_used{tp_rank} / _pages_total  pages per rank (requests' segments)
    sglang:fairkv_prefix_tier_pages{tp_rank}          pages the dense prefix tier caches per rank
    sglang:fairkv_kept_rows{tp_rank} / _transient_rows
    sglang:fairkv_plan_share_drift                    live kept shares vs the plan's source (-1: none)
    sglang:fairkv_replan_gain                         cost-model speedup of a fresh plan on live shares
    sglang:fairkv_plan_epoch                          plan switches so far (0: the plan the server started with)
    sglang:fairkv_replan_last_pause_seconds           the last switch's pause (-1: none yet)
    sglang:fairkv_replan_kv_bytes_moved               KV bytes moved between ranks by switches since start
    sglang:fairkv_live_profile_prompts                compressed prompts the live profile holds
    sglang:fairkv_prefix_tier_cached_tokens           prompt tokens the prefix cache holds (-1: cache off)
    sglang:fairkv_prefix_tier_hit_tokens              prompt tokens served from the cache since start
    sglang:fairkv_prefix_tier_hits                    cache hits (prefills that reused a cached prefix)

``docs/grafana/fairkv.json`` is a Grafana dashboard over these (and SGLang's own); a test checks that
every series it queries is exported.
"""

from __future__ import annotations

_GAUGES: dict | None = None

_SCALARS = {
    "attention_busy_rate": "Per-layer attention balance of the requests held now (sum of mean / sum of max "
                           "rank rows over layers).",
    "attention_busy_rate_since_start": "Per-layer attention balance over the sampled decode steps served.",
    "memory_busy_rate": "KV rows summed over layers: mean / max over TP ranks.",
    "plan_share_drift": "Live per-layer kept shares vs the plan's source stats (total variation, 0..1; -1 "
                        "when the plan has no source).",
    "replan_gain": "Cost-model speedup a fresh plan made from the live shares would give over the running one.",
    "live_profile_prompts": "Compressed prompts in the live profile.",
    "plan_epoch": "FairKV plan switches so far (0: the plan the server started with).",
    "replan_last_pause_seconds": "The last FairKV plan switch's pause, seconds (-1: no switch yet).",
    "replan_kv_bytes_moved": "KV bytes moved between TP ranks by FairKV plan switches since start.",
    "prefix_tier_cached_tokens": "Prompt tokens the dense prefix tier (prefix cache) holds (-1: prefix caching off).",
    "prefix_tier_hit_tokens": "Prompt tokens served from the dense prefix tier since start.",
    "prefix_tier_hits": "Prefills that reused a cached prefix since start.",
}
_PER_RANK = {
    "pages_used": "KV pages the requests' segments hold on each TP rank (fairkv ledger).",
    "prefix_tier_pages": "KV pages the dense prefix tier (cached prompts' dense KV) holds on each TP rank.",
    "pages_total": "Usable KV pages of each TP rank.",
    "kept_rows": "KV rows of compressed requests on each TP rank.",
    "transient_rows": "Dense prefill KV rows awaiting compression on each TP rank.",
}


def _gauges(labelnames: list[str]) -> dict:
    global _GAUGES
    if _GAUGES is None:
        from prometheus_client import Gauge

        g = {k: Gauge(f"sglang:fairkv_{k}", doc, labelnames=labelnames, multiprocess_mode="mostrecent")
             for k, doc in {**_SCALARS, **_PER_RANK}.items()}
        g["layer_balance"] = Gauge("sglang:fairkv_layer_balance", "Per layer: mean / max rank KV rows read now.",
                                   labelnames=[*labelnames, "layer"], multiprocess_mode="mostrecent")
        g["layer_rows"] = Gauge("sglang:fairkv_layer_rows", "KV rows each TP rank reads in each layer now.",
                                labelnames=[*labelnames, "layer"], multiprocess_mode="mostrecent")
        _GAUGES = g
    return _GAUGES


def export(collector, state) -> None:
    """Set the fairkv gauges from ``state`` (rank 0 only: the ledger is the whole group's). The values are
    those of :func:`~sglang_fairkv.telemetry.report.fairkv_stats` -- what ``/server_info`` shows -- read
    once."""
    from .report import fairkv_stats

    if state.rank_plan.rank != 0:
        return
    base = {k: str(v) for k, v in collector.labels.items()}
    base.setdefault("tp_rank", "0")
    base.setdefault("dp_rank", str(state.dp_rank or 0))  # SGLang labels it only with --dp-size; we always do
    g = _gauges(list(base))
    st = fairkv_stats(state)
    drift, since, prof = st["plan_drift"], st["attention_busy_rate_since_start"], st["live_profile"]
    scalars = {"attention_busy_rate": st["attention_busy_rate"],
               "attention_busy_rate_since_start": -1.0 if since is None else since,
               "memory_busy_rate": st["memory_busy_rate"],
               "plan_share_drift": -1.0 if drift is None or drift["share_drift"] is None else drift["share_drift"],
               "replan_gain": 1.0 if drift is None else drift["replan_gain"],
               "live_profile_prompts": 0 if prof is None else prof["samples"], "plan_epoch": st["plan_epoch"]}
    last = st["replan"]["last"]
    scalars.update(replan_last_pause_seconds=-1.0 if last is None else last["pause_ms"] / 1e3,
                   replan_kv_bytes_moved=st["replan"]["kv_bytes_moved_total"])
    tier = st.get("prefix_tier")
    scalars.update(prefix_tier_cached_tokens=-1 if tier is None else tier["cached_tokens"],
                   prefix_tier_hit_tokens=0 if tier is None else tier["hit_tokens"],
                   prefix_tier_hits=0 if tier is None else tier["hits"])
    for k, v in scalars.items():
        g[k].labels(**base).set(float(v))
    per_rank = {"pages_used": [r["pages_used"] for r in st["ranks"]],
                "prefix_tier_pages": [r["prefix_tier_pages"] for r in st["ranks"]],
                "pages_total": [r["pages_total"] for r in st["ranks"]],
                "kept_rows": st["kept_rows"], "transient_rows": st["transient_rows"]}
    for q, layer_rows in enumerate(st["layer_loads"]):
        lab = {**base, "tp_rank": str(q)}
        for k, v in per_rank.items():
            g[k].labels(**lab).set(float(v[q]))
        for layer, rows in enumerate(layer_rows):
            g["layer_rows"].labels(**lab, layer=str(layer)).set(float(rows))
    for layer, b in enumerate(st["layer_balance"]):
        g["layer_balance"].labels(**base, layer=str(layer)).set(b)
