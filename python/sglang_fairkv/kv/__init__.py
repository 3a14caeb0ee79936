"""The ragged per-(request, layer, KV head) KV pool and its bookkeeping; no SGLang import here.

``ragged_pool``: the pool (paged segments, host mirrors, one upload per step, deferred free);
``group_ledger``: every rank's segments, identical on every rank (admission under TP);
``admission``: what a request costs each rank, in pages; ``request_table``: per-``req_pool_idx`` rows;
``sizing``: how a rank's KV bytes become pages. SGLang's pool / allocator / budget interfaces over
them: :mod:`sglang_fairkv.serving`.
"""
