"""SGLang's ``token_to_kv_pool_allocator`` of a fairkv server: logical slots, capacity from the ledger.

SGLang's scheduler speaks in *token slots*: it allocates one slot per position (``req_to_token``) and
admits requests by ``available_size()``. Here those slots are **logical**: they index no KV bytes, so
there are many of them (``LOGICAL_SLOTS_PER_TOKEN`` x the token capacity), while the KV bytes live in
the ragged pool. Capacity is reported in **token equivalents** of free rows (rows / (layers x KV heads))
from the TP group's ledger (every rank's pages, identical on all ranks), so SGLang's own admission,
``new_token_ratio`` reservation, retraction, metrics and idle leak check all see the compressed
footprint and every rank's scheduler takes the same decisions.

The slots live in one preallocated int32 stack (``LOGICAL_SLOTS_PER_TOKEN x 4`` bytes a token, its
excess over the stock int64 list counted in the KV budget by :mod:`sglang_fairkv.kv.sizing`) with its
top on the host: ``alloc`` copies ``n`` ids off the top (one small copy kernel, int64 out), ``free``
writes ``n`` ids back (one copy kernel). The stock allocator's ``torch.cat`` of the whole free list on
every free (a transient second copy of it) never happens, and no call reads the device.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from ..kv.sizing import LOGICAL_SLOTS_PER_TOKEN
from .kv_cache import FairKVCache
from .prefill_budget import FairKVPrefillBudget
from .state import FairKVState


class FairKVTokenAllocator(TokenToKVPoolAllocator):
    """Logical slots for SGLang's ``req_to_token``; capacity answered from the ragged pool."""

    def __init__(self, state: FairKVState, *, max_total_tokens: int, dtype: torch.dtype, device: str,
                 kvcache: FairKVCache):
        self.state = state
        self.max_total_tokens = max_total_tokens
        self._stack: torch.Tensor | None = None
        super().__init__(max_total_tokens * LOGICAL_SLOTS_PER_TOKEN, dtype, device, kvcache,
                         need_sort=False)

    # ---- the slot stack (no torch.cat, no device read) ----------------------------------------
    @property
    def free_pages(self) -> torch.Tensor | None:
        """The free slots (int32 view of the stack; SGLang's debug census reads it)."""
        return None if self._stack is None else self._stack[:self._top]

    @free_pages.setter
    def free_pages(self, value) -> None:
        if value is not None:  # SGLang's base __init__ sets None; nothing else may assign
            raise AttributeError("the fairkv allocator's free slots live in its stack")

    def _reset_stack(self) -> None:
        if self._stack is None or self._stack.numel() != self.size:
            self._stack = torch.empty(self.size, dtype=torch.int32, device=self.device)
        # slot 0 is SGLang's padding slot: never handed out; the top holds 1, 2, 3 ...
        torch.arange(self.size, 0, -1, dtype=torch.int32, out=self._stack)
        self._top = self.size

    def alloc(self, need_size: int):
        if need_size > self._top:
            return None
        self._top -= need_size
        return self._stack[self._top:self._top + need_size].to(torch.int64)  # a copy, not a view

    def free(self, free_index: torch.Tensor):
        n = free_index.numel()
        if n == 0:
            return
        if self.free_group is not None:
            self.free_group.append(self._copy_for_free_group(free_index))
            return
        if self._top + n > self.size:
            raise RuntimeError(f"fairkv allocator: freeing {n} slots with {self.size - self._top} in use "
                               "(a slot freed twice)")
        self._stack[self._top:self._top + n] = free_index.reshape(-1)
        self._top += n

    def token_capacity_free(self) -> int:
        """Prompt tokens every TP rank still has rows for (the ledger's minimum over ranks). With the
        dense prefix tier its pages count as free and its live tokens as used (SGLang adds the tree's
        evictable tokens itself), so available + evictable + protected is the capacity at idle, as
        SGLang's leak check expects (block slack stays available)."""
        st = self.state
        lg = st.ledger
        if st.tier is None:
            return lg.token_capacity_free()
        return max(0, lg.tokens_for(lg.pages_free() + lg.tier_pages()) - st.tier.live_tokens)

    def available_size(self):
        return min(self._top, self.token_capacity_free())

    def logical_slots_free(self) -> int:
        return self._top

    def create_prefill_budget(self, tree_cache, *, num_mixed_decode_tokens=0):
        return FairKVPrefillBudget(self, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)

    def check_decode_capacity(self, *, num_tokens, tree_cache, requests=None, spec_algorithm=None) -> bool:
        if self._top < num_tokens:  # logical slots
            return False
        if requests is None:
            return self.token_capacity_free() >= num_tokens
        idx = [int(r.kv.req_pool_idx) for r in requests if r.kv.req_pool_idx is not None]
        if not idx:
            return True
        lg, tree = self.state.ledger, self.state.tree
        if tree is not None and not lg.decode_fits(idx):  # the prefix tier goes before a retraction
            tree.evict_until(lambda: lg.decode_fits(idx))
        return lg.decode_fits(idx)  # every rank's pages, the same answer on all

    def evict_to_free_tokens(self, tree_cache, num_tokens: int):
        """SGLang asks before each allocation in dense tokens; here the prefix tier is evicted where the
        pages are priced instead (the prefill budget, the decode check): only a shortage of logical
        slots (never expected: 16 per token of capacity) evicts here."""
        if tree_cache is None or not tree_cache.supports_prefix_sharing() or self._top >= num_tokens:
            return None
        evict = getattr(tree_cache, "evict_until", None)
        if evict is not None:
            evict(lambda: self._top >= num_tokens)
        return None

    def verify_byte_accounting(self) -> list:
        """Idle check (SGLang calls it with no request running): every ragged page must be free, on
        this rank's pool and in the group ledger."""
        st = self.state
        p, errs = st.pool, []
        if p.segment_pages() or p.used_tokens():
            errs.append(f"fairkv ragged pool not empty at idle: {p.segment_pages()} pages, "
                        f"{p.used_tokens()} rows in segments")
        if st.tier is not None:
            # at idle the tier holds exactly the tree's nodes: every live tier token is a node's
            tree = st.tree
            in_tree = 0 if tree is None else sum(n.fairkv_tok.size for n in tree._nodes()
                                                 if getattr(n, "fairkv_tok", None) is not None)
            live = st.tier.live_tokens
            if live != in_tree or st.requests.tier_tok:
                errs.append(f"fairkv prefix tier at idle: {live} live tier tokens, the tree holds {in_tree}, "
                            f"{len(st.requests.tier_tok)} requests still hold some")
            if tree is not None and tree.protected_size():
                errs.append(f"fairkv prefix tier at idle: {tree.protected_size()} tokens still locked")
        mismatch = self.state.ledger_mismatch()
        if mismatch:
            errs.append(mismatch)
        admitted = self.state.requests.admitted
        if int(self.state.ledger.segment_pages_used().sum()) or admitted:
            errs.append(f"fairkv ledger not empty at idle: pages per rank "
                        f"{self.state.ledger.segment_pages_used().tolist()}, {len(admitted)} admitted")
        return errs

    def clear(self):
        self._reset_stack()
        self.free_group = None
        self.release_pages = torch.empty((0,), dtype=torch.int64, device=self.device)
        if hasattr(self, "state"):
            for r in list(self.state.requests.admitted):
                self.state.release(r)
            self.state.pool.clear()
            if self.state.tier is not None:
                self.state.tier.clear()  # (the ledger reads its block count from it)
