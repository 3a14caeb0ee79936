"""How the KV bytes SGLang budgets for a rank become a ragged pool (pure arithmetic, no allocation).

A fairkv rank gets exactly the bytes SGLang's stock pool would take for ``--max-total-tokens`` tokens
(``max_total_tokens x rows_per_token_budget`` rows of ``row_bytes``), so every plan and method is
compared at equal memory. Out of those bytes come the segment tables
(:meth:`~sglang_fairkv.kv.ragged_pool.RaggedKVPool.table_bytes`), what the logical-slot allocator holds
beyond the stock one (:func:`allocator_extra_bytes`) and, on CUDA, the decode kernel's static scratch
(:meth:`~sglang_fairkv_kernels.DecodeWorkspace.bytes_for`, sized by the batch, not the pool); the rest
is pages.
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang_fairkv_kernels import DecodeWorkspace

from .ragged_pool import RaggedKVPool

#: Logical slots per token of physical capacity (SGLang's ``req_to_token`` entries index no KV bytes
#: on a fairkv server): how far compression may stretch the request set.
LOGICAL_SLOTS_PER_TOKEN = 16
#: bytes of one logical slot in the allocator's free stack (int32; SGLang's stock free list is int64)
LOGICAL_SLOT_BYTES = 4
STOCK_SLOT_BYTES = 8


def allocator_extra_bytes(max_total_tokens: int) -> int:
    """Device bytes the fairkv allocator's free stack takes beyond SGLang's stock allocator for the same
    ``max_total_tokens`` (which SGLang keeps outside the KV budget): ``16 x 4 - 8 = 56`` bytes a token."""
    return max_total_tokens * (LOGICAL_SLOTS_PER_TOKEN * LOGICAL_SLOT_BYTES - STOCK_SLOT_BYTES)


@dataclass(frozen=True)
class PoolSizes:
    """One rank's pool: ``pages`` usable pages (the reserved page 0 not counted), what the tables, the
    allocator's extra slots and the scratch take of ``budget_bytes``, and the kernel workspace's static
    sizes (``workspace_kw``)."""

    budget_bytes: int
    pages: int
    table_bytes: int
    scratch_bytes: int
    workspace_kw: dict
    allocator_bytes: int = 0


def rank_pool_sizes(*, max_total_tokens: int, rows_per_token_budget: int, row_bytes: int, heads: int,
                    page_size: int, num_layers: int, max_reqs: int, max_context: int, group: int,
                    head_dim: int, on_cuda: bool, metadata_in_budget: bool = True,
                    target_programs: int | None = None, store_row_bytes: int | None = None) -> PoolSizes:
    """The pool of a rank whose pool holds ``heads`` KV heads per layer (the most the plan gives it in
    any layer). ``rows_per_token_budget``: the rows per token SGLang sized this rank's memory for
    (layers x its stock per-rank KV heads). ``target_programs``: the decode grid's aim (about four
    programs per SM; None: the kernel's default). ``metadata_in_budget=False`` (unit tests of admission
    arithmetic only): every byte is pages. ``row_bytes``: a row in the dtype SGLang sized the budget in;
    ``store_row_bytes``: a row as the pool stores it (fp8: fewer bytes, more pages; default the same)."""
    budget = max_total_tokens * rows_per_token_budget * row_bytes
    page_bytes = page_size * (row_bytes if store_row_bytes is None else store_row_bytes)
    kw = dict(max_batch=max_reqs, num_heads=heads, group=group, head_dim=head_dim, num_layers=num_layers)
    if target_programs is not None:
        kw["target_programs"] = target_programs
    if not metadata_in_budget:
        return PoolSizes(budget, -(-budget // page_bytes), 0, 0, kw)
    table = RaggedKVPool.table_bytes(max_reqs=max_reqs, num_layers=num_layers, num_kv_heads=heads,
                                     max_context=max_context, page_size=page_size)
    scratch = DecodeWorkspace.bytes_for(**kw) if on_cuda else 0
    alloc = allocator_extra_bytes(max_total_tokens)
    return PoolSizes(budget, (budget - table - scratch - alloc) // page_bytes, table, scratch, kw, alloc)
