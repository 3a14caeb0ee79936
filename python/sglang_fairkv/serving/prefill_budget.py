"""SGLang's ``PrefillBudget`` for a fairkv server: one admission pass, charged per TP rank in pages.

SGLang's budget is one number of tokens, charged the dense prompt plus ``max_new_tokens``. Here a
request is charged, on every rank, the pages its segments will take there once compressed, and the
transient of its prefill: the numbers come from :mod:`~sglang_fairkv.kv.admission` (pure), this class
only speaks SGLang's protocol.

While SGLang's ``PrefillAdder`` considers a request, the ``current_req`` hook
(:func:`sglang_fairkv.serving.scheduler_hooks.adder_request_hook`) names it; the budget previews its
replicas (:meth:`ReplicaAssigner.choose`, counting the requests already taken in this pass), checks both
charges against every rank's free pages from the ledger, and on ``reserve`` records the choice
(``requests.planned``) so the ``prepare_for_extend`` hook admits the request with exactly the replicas
it was charged for. Every rank runs the same pass on the same ledger, so all take the same decision.
SGLang's scalar offsets (running requests' future decode scaled by ``new_token_ratio``, mixed decode
tokens) stay in tokens and are converted with the expected price (:attr:`GroupLedger.rows_per_token`):
one decode token is one row per segment for stock and fairkv alike. Without a named request (other
SGLang paths) the scalar rule applies, with two pages of slack per request.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sglang.srt.mem_cache.prefill_budget import PrefillBudget

from ..kv import admission
from .state import FairKVState


#: the most of a rank's pages that new prompts being written to the dense prefix tier (not yet in the
#: radix tree) may take at once (see ``FairKVPrefillBudget._tier_write_ok``)
TIER_WRITE_SHARE = 1 / 16


def _max_new_tokens(req) -> int:
    """The decode tokens SGLang reserves for ``req`` when its last chunk is admitted (its remaining
    ``max_new_tokens``, clipped as SGLang clips it)."""
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    sp = getattr(req, "sampling_params", None)
    if sp is None or sp.max_new_tokens is None:
        return 0
    return max(0, min(sp.max_new_tokens - len(getattr(req, "output_ids", ()) or ()), CLIP_MAX_NEW_TOKENS))


class FairKVPrefillBudget(PrefillBudget):
    """One admission pass (see the module docstring)."""

    def __init__(self, allocator, tree_cache, *, num_mixed_decode_tokens: int = 0):
        super().__init__(allocator, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)
        self.state: FairKVState = allocator.state
        tp = self.state.ledger.tp
        #: pages reserved in this pass per rank: this step's peak / what the requests hold afterwards
        self.pages_current = torch.zeros(tp, dtype=torch.int64)
        self.pages_total = torch.zeros(tp, dtype=torch.int64)
        #: pages the admitted requests hold once this step's forward ends (tests compare the pools)
        self.pages_after = torch.zeros(tp, dtype=torch.int64)
        self._current_req = None
        self._credit = 0  # see can_allocate_prefill
        #: pages per rank the running requests will still take (see :meth:`adopt_running`)
        self.running_pages = torch.zeros(tp, dtype=torch.int64)
        self.chunk_size: int | None = None
        self._pending = self.state.assigner.new_pending()
        self._preview: tuple[str, np.ndarray] | None = None
        self._preview_roomiest = False  # the preview is the roomiest choice, not the share rule's
        self._charge_memo: dict[tuple, admission.Charge] = {}  # see _charges
        self._tier_choice: dict[str, bool] = {}  # rid -> a new prompt without a cache hit is cached (_fits)
        self._tier_write_blocks = 0  # tier blocks the new prompts this pass caches will write
        self.state.requests.planned.clear()  # choices of an earlier pass that were never admitted
        self.state.requests.planned_charge.clear()
        self.state.requests.planned_tier.clear()

    @property
    def current_req(self):
        """The request SGLang's PrefillAdder is considering (set by the adder hook), else None."""
        return self._current_req

    @current_req.setter
    def current_req(self, req) -> None:
        self._current_req, self._credit = req, 0

    def adopt_running(self, adder) -> None:
        """After ``PrefillAdder.__init__`` (the adder-init hook): SGLang added every running request's
        remaining decode to ``total_offset`` in tokens (``new_token_ratio`` x tokens left); take that back
        and reserve instead each rank's exact pages still owed to those requests
        (:meth:`FairKVState.decode_pages_to_come`, same ratio): a decode token costs one row per
        segment, and a page per segment at a page boundary, which a scalar cannot price."""
        #: tokens of a pass's chunk (SGLang's chunked_prefill_size less mixed decode tokens), or None
        self.chunk_size = getattr(adder, "rem_chunk_tokens", None)
        self._charge_memo.clear()  # prices depend on the chunk size
        rb = getattr(adder, "running_batch", None)
        if rb is not None and rb.reqs:
            # SGLang's private per-request offset (0.5.23): the exact amount its __init__ added, so that
            # what is taken back is what was put in
            self.total_offset -= sum(adder._get_running_request_total_token_offset(r) for r in rb.reqs)
        self.running_pages = self.state.decode_pages_to_come(float(getattr(adder, "new_token_ratio", 1.0)))

    # ---- per-rank view ---------------------------------------------------------------------------
    def _offset_pages(self, tokens: float) -> torch.Tensor:
        lg = self.state.ledger
        return torch.ceil(max(0.0, tokens) * lg.rows_per_token / lg.page_size).to(torch.int64)

    def _pages_left(self, current: bool) -> torch.Tensor:
        """int64 ``[tp]``: free pages per rank after this pass's reservations and SGLang's offsets."""
        free = self.state.ledger.pages_free()
        if current:
            return free - self.pages_current - self._offset_pages(self.current_offset)
        return free - self.pages_total - self.running_pages - self._offset_pages(self.total_offset)

    def _remaining(self, current: bool) -> int:
        lg = self.state.ledger
        free = lg.pages_free() - (self.pages_current if current else self.pages_total + self.running_pages)
        offset = self.current_offset if current else self.total_offset
        return lg.tokens_for(free.clamp_min(0)) - offset + self.tree_cache.evictable_size()

    @property
    def remaining_total(self):
        return self._remaining(current=False)

    @property
    def remaining_current(self):
        return self._remaining(current=True) + self._credit

    def _segments(self, req):
        """``(owner [L, KV], current lengths [L, KV] or 0, choice or None)`` of the named request
        (choice None: the request is admitted already, a chunked prefill continuing)."""
        st = self.state
        idx = req.kv.req_pool_idx
        if idx is not None and st.requests.admitted.get(int(idx)) == req.rid:
            return st.ledger.owner[int(idx)], st.ledger.length[int(idx)], None
        if self._preview is not None and self._preview[0] == req.rid:
            chosen = self._preview[1]
        else:
            chosen = st.assigner.choose(max(1, len(req.full_untruncated_fill_ids)), self._pending)
            self._preview, self._preview_roomiest = (req.rid, chosen), False
        return st.assigner.owners_for(chosen), 0, chosen

    @property
    def _tree_on(self) -> bool:
        return self.state.tree is not None  # (set only by a live fairkv tree: a disabled one is SGLang's own)

    def _tier(self, req) -> bool:
        """Whether ``req``'s prefill goes through the dense prefix tier (its prompt is cached): a
        continuing prefill keeps the mode of its first chunk; a new request with a cache hit always
        (its prefix is the tier's); a new request without one when this pass chose so (see
        :meth:`_fits`: only if it fits without evicting anything, so caching a new prompt never costs
        the admission of another request)."""
        if not self._tree_on:
            return False
        idx = req.kv.req_pool_idx
        st = self.state
        if idx is not None and st.requests.admitted.get(int(idx)) == req.rid:
            return int(idx) in st.requests.tier_tok
        if int(req.prefix_len) > 0:
            return True
        return self._tier_choice.get(req.rid, False)

    def _tier_write_ok(self, req) -> bool:
        """Whether a new prompt without a cache hit may be cached: the dense prompts being written to the
        tier and not yet in the tree (this pass's, and prefills in flight) stay within
        :data:`TIER_WRITE_SHARE` of every rank's pages. Writing a prompt to the tier holds its dense KV in
        every layer during its prefill, where the classic prefill holds one layer at a time: the bound
        keeps what caching new prompts costs a burst of admissions to that share."""
        st, lg = self.state, self.state.ledger
        P, reqs = lg.page_size, st.requests
        in_flight = sum(-(-(int(t.size) - reqs.tier_own_from.get(r, 0)) // P) for r, t in reqs.tier_tok.items())
        blocks = self._tier_write_blocks + in_flight + -(-max(1, len(req.full_untruncated_fill_ids)) // P)
        return bool((lg.tier_pages(blocks).to(torch.float64) <= TIER_WRITE_SHARE * lg.usable).all())

    def _held_len(self, req, start) -> int:
        """Positions the request's prefill has behind it: with the tier its matched prefix and earlier
        chunks (``req.prefix_len``), else its segments' length (before compression all equal)."""
        if self._tier(req):
            return int(req.prefix_len)
        return int(torch.as_tensor(start).max())

    def _charges(self, req, extend_tokens: int, decode_tokens: int, owner=None) -> admission.Charge:
        """:func:`~sglang_fairkv.kv.admission.chunk_charge` (or, with the prefix tier,
        :func:`~sglang_fairkv.kv.admission.tier_chunk_charge`) of the named request's chunk of
        ``extend_tokens`` with ``decode_tokens`` decode; ``owner``: replicas to price instead of the
        request's own. Memoised per pass (a request is priced several times: fits, credit, reserve)."""
        own0, start, _ = self._segments(req)
        own = np.asarray(own0 if owner is None else owner, dtype=np.int64)
        n = max(1, len(req.full_untruncated_fill_ids))
        s = self._held_len(req, start)
        max_new = _max_new_tokens(req)
        tier = self._tier(req)
        key = (tier, n, s, extend_tokens, decode_tokens, max_new, own.tobytes())
        hit = self._charge_memo.get(key)
        if hit is None:
            st, lg = self.state, self.state.ledger
            if tier:
                hit = admission.tier_chunk_charge(
                    st.cfg, st.head_budgets, prompt_len=n, held_len=s, extend=extend_tokens,
                    decode=decode_tokens, max_new_tokens=max_new, owner=own, tp=lg.tp, page_size=lg.page_size,
                    tier_pages_per_block=lg.tier_pages_per_block)
            else:
                hit = admission.chunk_charge(
                    st.cfg, st.head_budgets, prompt_len=n, held_len=s, extend=extend_tokens,
                    decode=decode_tokens, max_new_tokens=max_new, owner=own, tp=lg.tp, page_size=lg.page_size,
                    chunk_size=self.chunk_size)
            self._charge_memo[key] = hit
        return hit

    def _roomiest_choice(self, req, extend_tokens: int, decode_tokens: int, left_now: torch.Tensor,
                         left_total: torch.Tensor) -> np.ndarray:
        """Replicas chosen for room instead of shares (:func:`~sglang_fairkv.kv.admission.roomiest_replicas`),
        each copied head's segment priced at the request's mean segment cost."""
        asg = self.state.assigner
        base = asg.base_owner
        c = self._charges(req, extend_tokens, decode_tokens, owner=base)
        room = torch.minimum(left_now - c.now, left_total - c.total)
        one = np.zeros_like(base)  # the mean cost of a segment: every segment on rank 0
        c1 = self._charges(req, extend_tokens, decode_tokens, owner=one)
        per_segment = -(-int(max(c1.now[0], c1.total[0])) // one.size)
        return admission.roomiest_replicas(room, asg.copied_ranks, per_segment)

    def _fits(self, req, extend_tokens: int, decode_tokens: int) -> bool:
        """Whether ``req`` fits every rank, this step's peak and what it holds afterwards. A new request
        whose share-keeping replicas do not fit (e.g. all its copies on one rank) is given the roomiest
        replicas instead, so a request that fits the group is never refused for its replica choice (an
        idle server must admit it)."""
        def ok() -> bool:
            left_now, left_total = self._pages_left(current=True), self._pages_left(current=False)
            c = self._charges(req, extend_tokens, decode_tokens)
            return bool((c.now <= left_now).all() and (c.total <= left_total).all())

        def ok_any_replicas() -> bool:
            if ok():
                return True
            _, _, chosen = self._segments(req)
            if chosen is None or not self.state.assigner.num_copied_heads:
                return False
            left_now, left_total = self._pages_left(current=True), self._pages_left(current=False)
            alt = self._roomiest_choice(req, extend_tokens, decode_tokens, left_now, left_total)
            self._preview, self._preview_roomiest = (req.rid, alt), True
            if ok():
                return True
            self._preview = None
            return False

        tree_on = self._tree_on
        idx = req.kv.req_pool_idx
        admitted = idx is not None and self.state.requests.admitted.get(int(idx)) == req.rid
        new_miss = tree_on and int(req.prefix_len) == 0 and not admitted
        if new_miss:
            # a new prompt is cached only when its dense prefill fits as it is: writing every layer's dense
            # KV at once costs more now than compressing layer by layer, so under memory pressure it runs
            # the classic way (not cached) and takes no more room than without a tier
            if self._tier_write_ok(req):
                self._tier_choice[req.rid] = True
                if ok_any_replicas():
                    return True
            self._tier_choice[req.rid] = False
        if ok_any_replicas():
            return True
        # the dense prefix tier is a cache: it goes (LRU, unlocked nodes) before a request waits; every
        # rank evicts the same nodes (the same pass on the same ledger)
        if tree_on and self.state.tree.evict_until(ok_any_replicas):
            return True
        if tree_on and int(req.prefix_len) > 0 and not admitted and self._classic_fits(req):
            # a cache hit whose rest does not fit through the tier (its dense KV in every layer at once)
            # but whose whole prompt fits the classic way: it waits this pass and comes back without its
            # match (``FairKVRadixCache.swa_reprefill_tail_tokens``), so a hit never needs more room than
            # the same prompt without a cache
            req.fairkv_no_reuse = True
        return False

    def _classic_fits(self, req) -> bool:
        """Whether ``req``'s whole prompt, without its cache hit, fits the classic way now (its first chunk
        of the pass's chunk size, compressing as it goes when that chunk ends the prompt)."""
        st, lg = self.state, self.state.ledger
        n = max(1, len(req.full_untruncated_fill_ids))
        ext = self._chunk(req, n, self.chunk_size)
        own, _, _ = self._segments(req)
        max_new = _max_new_tokens(req)
        c = admission.chunk_charge(st.cfg, st.head_budgets, prompt_len=n, held_len=0, extend=ext,
                                   decode=max_new if ext == n else 0, max_new_tokens=max_new,
                                   owner=np.asarray(own, dtype=np.int64), tp=lg.tp, page_size=lg.page_size,
                                   chunk_size=self.chunk_size)
        return bool((c.now <= self._pages_left(current=True)).all()
                    and (c.total <= self._pages_left(current=False)).all())

    def _chunk(self, req, extend_input_len: int, chunk_limit: int | None) -> int:
        """The chunk SGLang will run of ``extend_input_len`` remaining tokens (its chunking rule)."""
        if chunk_limit is None or extend_input_len <= chunk_limit:
            return extend_input_len
        return max(1, chunk_limit // self.page_size * self.page_size)

    # ---- SGLang's budget interface ----------------------------------------------------------------
    def check_prefill(self, *, extend_input_len, total_tokens, max_new_tokens, input_tokens,
                      swa_host_hit_length, chunk_limit, auxiliary_swa_host_hit_length=0):
        req = self.current_req

        if req is None:
            return super().check_prefill(
                extend_input_len=extend_input_len, total_tokens=total_tokens, max_new_tokens=max_new_tokens,
                input_tokens=input_tokens, swa_host_hit_length=swa_host_hit_length, chunk_limit=chunk_limit,
                auxiliary_swa_host_hit_length=auxiliary_swa_host_hit_length)
        ext = self._chunk(req, extend_input_len, chunk_limit)
        decode = total_tokens - extend_input_len if ext == extend_input_len else 0
        return (True, chunk_limit) if self._fits(req, ext, decode) else (False, None)

    def can_allocate_prefill(self, *, paged_input, extend_input_len, max_new_tokens, chunk_limit):
        req = self.current_req
        if req is None:
            return super().can_allocate_prefill(paged_input=paged_input, extend_input_len=extend_input_len,
                                                max_new_tokens=max_new_tokens, chunk_limit=chunk_limit)
        ext = self._chunk(req, extend_input_len, chunk_limit)
        decode = max_new_tokens if ext == extend_input_len else 0
        if not self._fits(req, ext, decode):
            return False
        # SGLang's ignore-eos look-ahead then subtracts ``paged_input`` (the dense prompt) from
        # ``remaining_current``: credit the difference to what this request really takes this step, so
        # the look-ahead works in the same units (cleared by reserve / the next request)
        lg = self.state.ledger
        now_tokens = admission.pages_as_tokens(self._charges(req, ext, 0).now, lg.rows_per_token, lg.page_size)
        self._credit = max(0, int(paged_input - math.ceil(now_tokens)))
        return True

    def available_chunk_tokens(self, chunk_limit):
        req = self.current_req
        if req is None:
            return super().available_chunk_tokens(chunk_limit)
        owner, start, _ = self._segments(req)
        s = self._held_len(req, start)
        rest = len(req.full_untruncated_fill_ids) - s
        if rest <= chunk_limit and self._fits(req, rest, 0):
            return chunk_limit  # the last chunk fits (compressing as it goes)
        lg = self.state.ledger
        if self._tier(req):  # a chunk's dense KV takes tier blocks: ppb pages per rank per P tokens
            return admission.chunk_that_fits(held_len=0, rest=rest, chunk_limit=chunk_limit,
                                             pages_left=self._pages_left(current=True),
                                             segments=lg.tier_pages_per_block, page_size=lg.page_size)
        return admission.chunk_that_fits(held_len=s, rest=rest, chunk_limit=chunk_limit,
                                         pages_left=self._pages_left(current=True),
                                         segments=lg.segments_per_rank(owner), page_size=lg.page_size)

    def reserve(self, extend_input_len, max_new_tokens, *, extra_tokens=0, chunk_limit=None,
                is_chunked_continuation=False):
        req = self.current_req
        if req is None:
            slack = 2 * self.state.pool.page_size
            return super().reserve(extend_input_len, max_new_tokens, extra_tokens=extra_tokens + slack,
                                   chunk_limit=chunk_limit, is_chunked_continuation=is_chunked_continuation)
        _, _, chosen = self._segments(req)
        c = self._charges(req, extend_input_len, max_new_tokens)
        self.pages_current += c.now
        self.pages_total += c.total
        self.pages_after += c.after
        self._credit = 0
        # SGLang's extra (page alignment it already counts, request-slot/mamba reserves: 0 here)
        extra = max(0, extra_tokens + self.page_size)
        self.current_offset += extra
        self.total_offset += extra
        reqs = self.state.requests
        if c.last:  # what it holds for the rest of its life (shown as the mix in /server_info)
            life = (c.total + c.held).numpy()
            if chosen is None:
                reqs.charged[int(req.kv.req_pool_idx)] = life
            else:
                reqs.planned_charge[req.rid] = life
        if chosen is not None:  # a new request: these replicas are the ones it was charged for
            reqs.planned[req.rid] = chosen
            reqs.planned_tier[req.rid] = tier = self._tier(req)
            if tier and int(req.prefix_len) == 0:
                self._tier_write_blocks += -(-max(1, len(req.full_untruncated_fill_ids)) // self.state.ledger.page_size)
            self.state.roomiest_admissions += int(self._preview_roomiest)
            weight = max(1, len(req.full_untruncated_fill_ids))
            for i, j in enumerate(chosen):
                self._pending[i][j] += weight
        self._preview = None
