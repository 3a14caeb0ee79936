"""SGLang's radix cache over the dense prefix tier (``--radix-cache-backend fairkv``, each scheduler).

SGLang's :class:`RadixCache` maps token prefixes to *logical* slots (which index no KV bytes here).
This subclass gives every tree node the **tier tokens** of its positions as well (``node.fairkv_tok``,
host int64, sliced and split with the node), so a prompt that matches a cached prefix finds that
prefix's dense KV in the tier (:mod:`sglang_fairkv.kv.prefix_tier`) without reading the device. What
changes against SGLang's tree:

* **Only prefilled KV is cached.** A request's prompt (and, after a retraction, whatever its re-prefill
  computed) goes in at SGLang's checkpoints during its prefill; its decode tokens never do: their K/V
  were computed over the *compressed* context, so they are not the dense K/V a prefill of the same
  tokens computes, and reusing them would change the next turn's output (kvpress, and the server
  without reuse, prefill them densely). A second chat turn therefore reuses the first turn's prompt
  and prefills the answer and the new message.
* **Never locked after the prefill that wrote it.** Once the prompt is inserted (its last chunk's
  checkpoint, or the release of a request that finished in that step) the request drops its tree lock:
  it decodes from its own compressed segments, and the cached prefix is evictable LRU from then on. At
  finish nothing more is inserted.
* **The last window is always recomputed.** A compressed prompt matches at most ``len - window``
  tokens (SGLang's ``swa_reprefill_tail_tokens`` cap), so its window's queries exist for scoring.
* **Evicting a node frees its tier tokens** (and blocks, i.e. pages, once empty); ``reset`` (SGLang's
  ``/flush_cache``) frees them all.
"""

from __future__ import annotations

import logging

import numpy as np
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixCache

from ..compress.footprint import compresses

logger = logging.getLogger(__name__)

BACKEND_NAME = "fairkv"


class FairKVRadixCache(RadixCache):
    """A radix tree whose nodes carry tier tokens (see the module docstring)."""

    def __init__(self, params, state):
        self.state = state
        self._pending_tok: np.ndarray | None = None
        super().__init__(params)
        state.tree = self

    # ---- tier tokens on nodes -----------------------------------------------------------------
    def _nodes(self):
        stack = list(self.root_node.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def path_tok(self, node) -> np.ndarray:
        """int64 host ``[len(path)]``: tier tokens of the positions from the root to ``node``."""
        parts = []
        while node is not self.root_node and node is not None:
            parts.append(node.fairkv_tok)
            node = node.parent
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(parts[::-1])

    def reset(self):
        state = getattr(self, "state", None)
        if state is not None and state.tier is not None and hasattr(self, "root_node"):
            toks = [n.fairkv_tok for n in self._nodes() if getattr(n, "fairkv_tok", None) is not None]
            if toks:
                state.tier_release(np.concatenate(toks))
        super().reset()

    def _split_node(self, key, child, split_len):
        tok = getattr(child, "fairkv_tok", None)
        new = super()._split_node(key, child, split_len)
        if tok is not None:
            new.fairkv_tok, child.fairkv_tok = tok[:split_len], tok[split_len:]
        return new

    def _insert_helper(self, node, key, value, priority=0, inserted_len=0):
        prefix_len, last = super()._insert_helper(node, key, value, priority, inserted_len)
        if last is not self.root_node and getattr(last, "fairkv_tok", None) is None:
            tok = self._pending_tok
            if tok is None or tok.size < prefix_len + len(last.key):
                raise AssertionError("fairkv prefix cache: a node inserted without its tier tokens")
            last.fairkv_tok = tok[prefix_len:prefix_len + len(last.key)].copy()
        return prefix_len, last

    def _delete_leaf(self, node):
        super()._delete_leaf(node)
        tok = getattr(node, "fairkv_tok", None)
        if tok is not None and tok.size:
            self.state.tier_stats["evicted_blocks"] += self.state.tier_release(tok)
            node.fairkv_tok = None

    # ---- SGLang's request paths -----------------------------------------------------------------
    def swa_reprefill_tail_tokens(self, req=None) -> int:
        """A compressed prompt's last ``window`` tokens are always prefilled (their queries score); a
        request the admission turned back for a hit it has no room to use through the tier
        (``fairkv_no_reuse``, :meth:`FairKVPrefillBudget._fits`) matches nothing: it prefills the classic way."""
        if req is None:
            return 0
        cfg = self.state.cfg
        n = len(req.origin_input_ids) + len(req.output_ids)
        if getattr(req, "fairkv_no_reuse", False):
            return n
        return int(cfg.window) if cfg.enabled and compresses(cfg, n) else 0

    def _insert_cache(self, req, token_ids, *, key_limit=None, split_prompt=False):
        r = int(req.kv.req_pool_idx)
        reqs = self.state.requests
        tok = reqs.tier_tok.get(r)
        self._pending_tok = tok
        try:
            radix_key, kv_indices, prefix_len = super()._insert_cache(
                req, token_ids, key_limit=key_limit, split_prompt=split_prompt)
        finally:
            self._pending_tok = None
        own = reqs.tier_own_from.get(r, 0)
        if prefix_len < own:
            raise AssertionError("fairkv prefix cache: a locked prefix went missing from the tree")
        if prefix_len > own:  # the tree had these positions already: the request's are duplicates
            self.state.tier_release(tok[own:prefix_len])
        reqs.tier_own_from[r] = max(own, len(radix_key))  # the new node owns the rest of the key
        return radix_key, kv_indices, prefix_len

    def checkpoint(self, req, *, up_to: int):
        """SGLang's checkpoint (each prefill chunk; at release) for what the tier holds of ``req``: its
        prefilled positions. After the chunk that ends the prompt the request's tree lock is dropped."""
        st = self.state
        r = req.kv.req_pool_idx
        # the request still holds tier tokens only until the checkpoint that ends its prefill (the release
        # of a request that finished in its prefill step, e.g. one new token, is that checkpoint); its
        # prefix is locked until then, so inserting is safe; later calls (at finish) insert nothing
        tok = None if r is None else st.requests.tier_tok.get(int(r))
        if self.disable or tok is None:
            return
        r = int(r)
        up_to = min(int(up_to), int(tok.size))
        if up_to > req.kv.cache_protected_len:
            super().checkpoint(req, up_to=up_to)
            path = self.path_tok(req.last_node)
            tok[:path.size] = path  # duplicates now read the tree's tokens
        if st.requests.prompt_done[r] or req.finished():  # (a finished request's row is reset already)
            self.unlock(req.lock)  # never locked after the prefill that wrote it
            req.lock = None
            st.tier_drop_request(r)  # positions past the key (none with page size 1) go back
            st.tier_stats["inserted_prompts"] += 1
            self.enforce_cap()

    def on_release(self, req, *, checkpointed: bool) -> None:
        """The end of SGLang's ``release_kv_cache``: tier tokens the request still owns (not taken by the
        checkpoint: an abort, a retraction, a request barred from the tree) go back."""
        super().on_release(req, checkpointed=checkpointed)
        if req.kv.req_pool_idx is not None:
            self.state.tier_drop_request(int(req.kv.req_pool_idx))

    # ---- eviction ----------------------------------------------------------------------------
    def evict_one(self) -> bool:
        """Evict the least recently used evictable leaf; False when none is left."""
        if not self.evictable_leaves:
            return False
        res = self.evict(EvictParams(num_tokens=1))
        return bool(res.num_tokens_evicted)

    def evict_until(self, ok) -> bool:
        """Evict LRU leaves until ``ok()`` holds or nothing is evictable; returns ``ok()``."""
        while not ok():
            if not self.evict_one():
                return ok()
        return True

    def enforce_cap(self) -> None:
        """Keep the tier within ``--fairkv-prefix-tier`` of each rank's pages (LRU beyond)."""
        st = self.state
        cap = st.tier_cap_pages
        if cap is not None:
            self.evict_until(lambda: bool((st.ledger.tier_pages() <= cap).all()))


def register_radix_cache_backend() -> None:
    """``--radix-cache-backend fairkv`` in this process (the scheduler builds its tree through it)."""
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend as reg

    if get_radix_cache_factory(BACKEND_NAME) is None:
        reg(BACKEND_NAME, _factory)


def _factory(ctx):
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    from .pool_hooks import process_state

    state = process_state()
    if ctx.disable_radix_cache or state is None or state.tier is None:
        return default_radix_cache_factory(ctx)
    return FairKVRadixCache(ctx.params, state)
