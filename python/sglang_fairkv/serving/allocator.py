"""SGLang's ``token_to_kv_pool_allocator`` of a fairkv server: logical slots, capacity from the ledger.

SGLang's scheduler speaks in *token slots*: it allocates one slot per position (``req_to_token``) and
admits requests by ``available_size()``. Here those slots are **logical**: they index no KV bytes, so
there are many of them (``LOGICAL_SLOTS_PER_TOKEN`` x the token capacity), while the KV bytes live in
the ragged pool. Capacity is reported in **token equivalents** of free rows (rows / (layers x KV heads))
from the TP group's ledger (every rank's pages, identical on all ranks), so SGLang's own admission,
``new_token_ratio`` reservation, retraction, metrics and idle leak check all see the compressed
footprint and every rank's scheduler takes the same decisions.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from .kv_cache import FairKVCache
from .prefill_budget import FairKVPrefillBudget
from .state import FairKVState

#: Logical slots per token of physical capacity: how far compression may stretch the request set.
LOGICAL_SLOTS_PER_TOKEN = 16


class FairKVTokenAllocator(TokenToKVPoolAllocator):
    """Logical slots for SGLang's ``req_to_token``; capacity answered from the ragged pool."""

    def __init__(self, state: FairKVState, *, max_total_tokens: int, dtype: torch.dtype, device: str,
                 kvcache: FairKVCache):
        self.state = state
        self.max_total_tokens = max_total_tokens
        super().__init__(max_total_tokens * LOGICAL_SLOTS_PER_TOKEN, dtype, device, kvcache,
                         need_sort=False)

    def token_capacity_free(self) -> int:
        """Prompt tokens every TP rank still has rows for (the ledger's minimum over ranks)."""
        return self.state.ledger.token_capacity_free()

    def available_size(self):
        return min(super().available_size(), self.token_capacity_free())

    def create_prefill_budget(self, tree_cache, *, num_mixed_decode_tokens=0):
        return FairKVPrefillBudget(self, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)

    def check_decode_capacity(self, *, num_tokens, tree_cache, requests=None, spec_algorithm=None) -> bool:
        if super().available_size() < num_tokens:  # logical slots
            return False
        if requests is None:
            return self.token_capacity_free() >= num_tokens
        idx = [int(r.kv.req_pool_idx) for r in requests if r.kv.req_pool_idx is not None]
        if not idx:
            return True
        return self.state.ledger.decode_fits(idx)  # every rank's pages, the same answer on all

    def verify_byte_accounting(self) -> list:
        """Idle check (SGLang calls it with no request running): every ragged page must be free, on
        this rank's pool and in the group ledger."""
        p, errs = self.state.pool, []
        if p.used_pages() or p.used_tokens():
            errs.append(f"fairkv ragged pool not empty at idle: {p.used_pages()} pages, "
                        f"{p.used_tokens()} rows in segments")
        mismatch = self.state.ledger_mismatch()
        if mismatch:
            errs.append(mismatch)
        admitted = self.state.requests.admitted
        if int(self.state.ledger.pages_used().sum()) or admitted:
            errs.append(f"fairkv ledger not empty at idle: pages per rank "
                        f"{self.state.ledger.pages_used().tolist()}, {len(admitted)} admitted")
        return errs

    def clear(self):
        super().clear()
        if hasattr(self, "state"):
            for r in list(self.state.requests.admitted):
                self.state.release(r)
            self.state.pool.clear()
