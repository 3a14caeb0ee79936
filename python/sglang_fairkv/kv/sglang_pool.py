"""The ragged pool behind SGLang's two pool interfaces (thin adapter; the structure is ragged_pool).

SGLang's scheduler speaks in *token slots*: it allocates one slot per position (``req_to_token``)
and admits requests by ``available_size()``. Here those slots are **logical**: they index no KV
bytes, so there are many of them (``LOGICAL_SLOTS_PER_TOKEN`` x the token capacity). The KV bytes
live in :class:`RaggedKVPool`, in the bytes SGLang's stock pool would take for ``--max-total-tokens``
tokens (``max_total_tokens * layers * kv_heads`` rows) minus the segment page tables (and on CUDA the
decode kernel's static scratch), plus one reserved page.
The allocator reports capacity in **token equivalents** of free rows (``rows / (layers * kv_heads)``),
so SGLang's own admission, ``new_token_ratio`` reservation, retraction, metrics and idle leak check
all see the compressed footprint.

* :class:`FairKVState` -- per-process state shared by the allocator, the attention backend and the
  scheduler hooks: the ragged pool, the compression setting, the rank's view of the FairKV plan, the
  replica assigner, the TP group's page ledger, and small per-``req_pool_idx`` tables.
* :class:`FairKVCache` -- SGLang's ``token_to_kv_pool``; holds no dense per-layer buffer.
* :class:`FairKVTokenAllocator` -- SGLang's ``token_to_kv_pool_allocator`` (logical slots + capacity
  hooks in token equivalents).

Under TP every rank's scheduler must take the same admission and retraction decisions; capacity is
therefore answered from :class:`~sglang_fairkv.kv.group_accounting.GroupLedger` (every rank's pages,
identical on all ranks): a request is admitted only when every rank has room for its segments.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import KVCache
from sglang.srt.mem_cache.prefill_budget import PrefillBudget

from .. import env
from ..compress import footprint
from ..compress.policy import CompressConfig
from ..placement.replicas import ReplicaAssigner
from ..placement.runtime import RankPlan
from .group_accounting import GroupLedger
from .live_traffic import LiveTraffic
from .ragged_pool import RaggedKVPool

logger = logging.getLogger(__name__)

#: Logical slots per token of physical capacity: how far compression may stretch the request set.
LOGICAL_SLOTS_PER_TOKEN = 16


@dataclass
class FairKVState:
    """Everything per scheduler process that the allocator, the backend and the hooks share.

    ``target_len``: int64 ``[max_reqs]`` (CPU), the prompt length (``fill_ids``) a request's prefill
    will reach; written by the ``prepare_for_extend`` hook, read by the backend to know a chunk is
    the last one (compress then). ``q_stash``: the last ``window`` post-RoPE queries per layer of a
    request whose prefill is chunked (only while it is), ``{req_pool_idx: [layer] -> [w, Hq, D]}``.
    """

    pool: RaggedKVPool
    cfg: CompressConfig
    head_budgets: torch.Tensor | None
    target_len: torch.Tensor
    rank_plan: RankPlan
    ledger: GroupLedger
    assigner: ReplicaAssigner
    q_stash: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    kept_log: dict[int, list[int]] = field(default_factory=dict)
    profile_path: str | None = None
    #: req_pool_idx -> rid of the admitted request holding it
    admitted: dict[int, str] = field(default_factory=dict)
    #: rid -> replica choice made by this admission pass's budget (consumed by :meth:`admit`)
    planned: dict[str, np.ndarray] = field(default_factory=dict)
    #: requests admitted with the roomiest replicas because the share rule's choice did not fit
    roomiest_admissions: int = 0
    #: seconds between the per-rank KV log lines (rank 0, while requests arrive)
    log_interval_s: float = 10.0
    _last_log: float = 0.0
    #: the Triton decode kernel's static bounds and scratch (CUDA), counted in the KV budget
    workspace: object | None = None
    #: forward batches whose host indices had to be read back from the device (should stay 0)
    host_index_readbacks: int = 0
    #: rid -> pages per rank the admission pass charged it for its whole life (kept + decode), until
    #: admitted; then by req_pool_idx in ``charged``
    planned_charge: dict[str, np.ndarray] = field(default_factory=dict)
    #: the served traffic as the plan sees it (live profile, balance since start, drift report)
    traffic: LiveTraffic | None = None

    def __post_init__(self):
        if self.traffic is None:
            self.traffic = LiveTraffic(self.rank_plan.plan.num_layers, self.rank_plan.plan.num_kv_heads,
                                       window=env.live_window(), sample_every=env.balance_sample_steps(),
                                       drift_interval_s=env.drift_interval_s())
        self._local_heads = self.rank_plan.local_heads
        self.heads_per_layer = [len(h) for h in self._local_heads]
        n = self.target_len.shape[0]
        #: bool [max_reqs]: the request's prompt is done (compressed); until then its rows are transient
        self.prompt_done = np.zeros(n, dtype=np.bool_)
        #: bool [max_reqs]: the request decodes all its max_new_tokens (ignore_eos): reserved in full
        self.fixed_length = np.zeros(n, dtype=np.bool_)
        #: int64 [max_reqs, tp]: pages each rank was charged for the request's whole life
        self.charged = np.zeros((n, self.rank_plan.tp), dtype=np.int64)

    def prompts_done(self, req_pool_idx: np.ndarray) -> None:
        """These requests' prompts end in the step being built (compressed by its end)."""
        self.prompt_done[np.asarray(req_pool_idx, dtype=np.int64)] = True

    def host_req_pool_indices(self, forward_batch) -> np.ndarray:
        """int64 host ``req_pool_indices`` of a forward batch without reading the device: SGLang's
        scheduler keeps them (``ScheduleBatch.req_pool_indices_cpu``); ForwardBatch carries them for
        prefill, and for decode the ``ForwardBatch.init_new`` hook adds them. Otherwise they are read
        back (a sync on CUDA; counted in ``host_index_readbacks``, which the e2e test expects at 0)."""
        cpu = getattr(forward_batch, "req_pool_indices_cpu", None)
        if cpu is not None:
            return cpu.numpy().astype(np.int64, copy=False)
        self.host_index_readbacks += 1
        if self.host_index_readbacks == 1:
            logger.warning("sglang-fairkv: a forward batch without SGLang's host req_pool_indices; "
                           "reading them back from the device (a host sync per step)")
        return forward_batch.req_pool_indices.cpu().numpy().astype(np.int64)

    def local_heads(self, layer: int) -> list[int]:
        """Global KV head ids this rank holds in ``layer`` (its local heads ``0..n-1`` in order)."""
        return self._local_heads[layer]

    def admit(self, req_pool_idx: int, rid: str, weight: int) -> None:
        """A request's first prefill chunk: choose its replicas (same choice on every rank), record
        who holds each segment in the ledger, and activate this rank's segments. Idempotent."""
        if req_pool_idx in self.admitted:
            return
        self.assigner.admit(rid, max(1, weight), self.planned.pop(rid, None))
        owner = self.assigner.owners(rid)  # [L, KV]
        self.ledger.admit(req_pool_idx, owner)
        mask = np.zeros((self.pool.num_layers, self.pool.num_kv_heads), dtype=np.bool_)
        for l, heads in enumerate(self._local_heads):
            mask[l, :len(heads)] = owner[l, heads] == self.rank_plan.rank
        self.pool.set_active(req_pool_idx, mask)
        self.admitted[req_pool_idx] = rid
        self.prompt_done[req_pool_idx] = False
        charge = self.planned_charge.pop(rid, None)
        self.charged[req_pool_idx] = 0 if charge is None else charge

    def record_prompt(self, req_pool_idx: int, prompt_len: int) -> None:
        """A prompt is done: its kept tokens per (layer, KV head) of the whole model (the ledger: this
        rank's own segments are its pool's lengths) go to the live profile (when it was compressed) and
        to the profile file (if on)."""
        kept = self.ledger.length[req_pool_idx].numpy()
        if footprint.compresses(self.cfg, prompt_len):
            self.traffic.record(kept, prompt_len)
        if self.profile_path is None:
            return
        import json

        with open(self.profile_path, "a") as f:
            f.write(json.dumps({"req_pool_idx": req_pool_idx, "prompt_len": prompt_len,
                                "kept": kept.tolist()}) + "\n")

    def live_profile(self) -> dict | None:
        """The live profile with what makes it a ``fairkv-stats/1`` file (model shape, method, budget)."""
        prof = self.traffic.profile()
        if prof is None:
            return None
        plan, cfg = self.rank_plan.plan, self.cfg
        return {**prof, "model": plan.model, "num_layers": plan.num_layers, "num_kv_heads": plan.num_kv_heads,
                "num_q_heads": self.rank_plan.num_q_heads, "head_dim": self.pool.head_dim,
                "method": cfg.method, "budget": cfg.budget if cfg.budget is not None else cfg.ratio}

    def decode_step(self, req_pool_idx: np.ndarray) -> None:
        """A decode step of these requests (host ``[b]``) is being launched: the per-layer balance of
        the rows it reads is sampled every few steps (host, ``[b, L, KV]`` of the ledger)."""
        self.traffic.decode_step(lambda: self.ledger.layer_loads(req_pool_idx))

    def drift(self) -> dict | None:
        """The plan-drift report (:mod:`~sglang_fairkv.placement.drift`) on the live traffic; rank 0 of a
        TP group only (the planner runs on the host), None elsewhere, at TP 1 (nothing to balance) or
        before a compressed prompt."""
        if self.rank_plan.rank != 0 or self.rank_plan.tp == 1:
            return None
        return self.traffic.drift(self.rank_plan.plan, num_q_heads=self.rank_plan.num_q_heads,
                                  head_dim=self.pool.head_dim)

    @property
    def rows_per_token(self) -> int:
        """KV rows this rank holds per prompt token (its heads summed over layers)."""
        return sum(self.heads_per_layer)

    def release(self, req_pool_idx: int) -> int:
        """Free every segment of one request (finish, abort, retract); returns pages freed here."""
        self.q_stash.pop(req_pool_idx, None)
        self.kept_log.pop(req_pool_idx, None)
        self.target_len[req_pool_idx] = -1
        self.prompt_done[req_pool_idx] = False
        self.fixed_length[req_pool_idx] = False
        self.charged[req_pool_idx] = 0
        rid = self.admitted.pop(req_pool_idx, None)
        if rid is not None:
            self.assigner.release(rid)
        self.ledger.release(req_pool_idx)
        return self.pool.free(req_pool_idx)

    def maybe_log_group_usage(self) -> None:
        """Rank 0, at most every ``log_interval_s``: KV rows in use per rank and the busy rate."""
        import time

        now = time.monotonic()
        if self.rank_plan.rank != 0 or now - self._last_log < self.log_interval_s:
            return
        self._last_log = now
        lg = self.ledger
        loads = lg.layer_loads()
        kept, transient = self.kept_and_transient_rows()
        tr, drift = self.traffic, self.drift()
        since = tr.attention_busy_rate_since_start()
        logger.info("sglang-fairkv KV per rank: rows %s (kept %s, transient prefill %s), pages %s of %s, memory "
                    "busy rate %.3f, attention busy rate %.3f (per layer, min %.3f; since start %s), %d "
                    "requests, the empty pool would admit %s at this mix (plan %s; share drift %s, re-plan "
                    "gain %s over %d prompts)", lg.rows_used().tolist(), kept.tolist(),
                    transient.tolist(), lg.pages_used().tolist(), lg.usable.tolist(), lg.busy_rate(),
                    lg.attention_busy_rate(loads), float(lg.layer_balance(loads).min()),
                    "-" if since is None else f"{since:.3f}", len(self.admitted),
                    self.admissible_when_empty(), self.rank_plan.plan.strategy,
                    "-" if drift is None or drift["share_drift"] is None else f"{drift['share_drift']:.3f}",
                    "-" if drift is None else f"{drift['replan_gain']:.3f}", min(tr.seen, tr.window))

    def decode_pages_to_come(self, new_token_ratio: float) -> torch.Tensor:
        """int64 ``[tp]``: pages each rank still owes the requests past their prompt: what each was
        charged for its life (kept + decode) minus what it holds, per rank exact (a copy counted where
        its replica is), scaled like SGLang's running-request reservation (``new_token_ratio``, or 1 for
        a request that decodes all its tokens)."""
        lg = self.ledger
        idx = np.fromiter(self.admitted, dtype=np.int64)
        if idx.size:
            idx = idx[self.prompt_done[idx]]
        if idx.size == 0:
            return torch.zeros(lg.tp, dtype=torch.int64)
        per_req = lg.pages_per_request(idx).numpy()
        left = np.maximum(0, self.charged[idx] - per_req)
        ratio = np.where(self.fixed_length[idx], 1.0, min(1.0, max(0.0, new_token_ratio)))
        return torch.from_numpy(np.ceil((left * ratio[:, None]).sum(axis=0)).astype(np.int64))

    def kept_and_transient_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``[tp]`` each: KV rows of requests whose prompt is done (compressed, plus decode) and of
        requests still in prefill (dense chunks awaiting their last one), from the ledger."""
        done = self.prompt_done
        return self.ledger.rows_where(done).numpy(), self.ledger.rows_where(~done).numpy()

    def admissible_when_empty(self) -> int | None:
        """Requests the empty pool would admit at the mix now running: usable pages over the mean pages
        per rank the admitted requests were charged (kept + decode), the fullest rank deciding; None with
        nothing admitted."""
        idx = np.fromiter(self.admitted, dtype=np.int64)
        if idx.size == 0:
            return None
        mean = self.charged[idx].mean(axis=0)
        held = mean > 0
        if not held.any():
            return None
        return int(np.floor(self.ledger.usable.numpy()[held] / mean[held]).min())

    def ledger_mismatch(self) -> str | None:
        """None when the ledger's page count for this rank equals the real pool's, else why not."""
        mine = int(self.ledger.pages_used()[self.rank_plan.rank])
        if mine != self.pool.used_pages():
            return (f"fairkv ledger says rank {self.rank_plan.rank} uses {mine} pages, its pool "
                    f"uses {self.pool.used_pages()}")
        return None

    def stats(self) -> dict:
        p, lg = self.pool, self.ledger
        used_rows, used_pages = p.used_tokens(), p.used_pages()
        rows, pages = lg.rows_used(), lg.pages_used()
        rpt = lg.rows_per_token.clamp_min(1)
        loads, memory_balance = lg.layer_loads(), lg.busy_rate()
        kept, transient = self.kept_and_transient_rows()
        return {
            "kv_compress": self.cfg.method,
            "plan": self.rank_plan.plan.strategy,
            "tp_rank": self.rank_plan.rank,
            "page_size": p.page_size,
            "pages_total": p.usable_pages,
            "pages_used": used_pages,
            "rows_in_segments": used_rows,
            "token_equivalents_in_use": used_rows / max(1, self.rows_per_token),
            "pool_bytes_in_use": used_pages * p.page_size * p.bytes_per_row(),
            "requests_with_segments": p.requests_holding(),
            "page_table_bytes": p.table_bytes(max_reqs=p.max_reqs, num_layers=p.num_layers,
                                              num_kv_heads=p.num_kv_heads, max_context=p.max_context,
                                              page_size=p.page_size),
            "decode_host_index_readbacks": self.host_index_readbacks,
            "requests_admitted": len(self.admitted),
            # issue 14: rows of compressed requests vs dense prefill rows awaiting their last chunk
            "kept_rows": kept.tolist(),
            "transient_rows": transient.tolist(),
            "requests_in_prefill": int((~self.prompt_done[np.fromiter(self.admitted, dtype=np.int64)]).sum())
            if self.admitted else 0,
            "admissible_when_empty": self.admissible_when_empty(),
            "peak_pages_used": p.peak_used,
            "ledger_matches_pool": self.ledger_mismatch() is None,
            # the whole TP group, from the ledger (identical on every rank)
            "ranks": [{"rank": q, "rows_in_use": int(rows[q]), "pages_used": int(pages[q]),
                       "pages_total": int(lg.usable[q]),
                       "token_equivalents_in_use": float(rows[q] / rpt[q])} for q in range(lg.tp)],
            "busy_rate": memory_balance,  # the historical key
            "memory_busy_rate": memory_balance,
            # per-layer attention balance: each rank's rows read per layer, the step's busy rate
            "attention_busy_rate": lg.attention_busy_rate(loads),
            "layer_balance": [round(x, 4) for x in lg.layer_balance(loads).tolist()],
            "layer_loads": loads.tolist(),
            # issue 18: the served traffic (sampled decode steps; compressed prompts), and the plan vs it
            "attention_busy_rate_since_start": self.traffic.attention_busy_rate_since_start(),
            "layer_balance_since_start": self.traffic.layer_balance_since_start(),
            "balance_samples": self.traffic.balance_samples,
            "live_profile": self.live_profile(),
            "plan_drift": self.drift(),
            "plan_has_source": bool(self.rank_plan.plan.source),
            "group_token_capacity": lg.capacity_when_empty(),
            "plan_copies_per_layer": self.rank_plan.plan.copies_per_layer(),
            "replicas": self.assigner.served(),
            "roomiest_admissions": self.roomiest_admissions,
        }


class FairKVCache(KVCache):
    """``token_to_kv_pool`` of a fairkv server: the ragged pool, no dense per-layer buffers."""

    def __init__(self, state: FairKVState, *, size: int, page_size: int, dtype: torch.dtype,
                 layer_num: int, device: str, start_layer: int | None = None,
                 end_layer: int | None = None):
        super().__init__(size, page_size, dtype, layer_num, device, False, start_layer, end_layer)
        self.state = state
        self.head_num = state.pool.num_kv_heads
        self.head_dim = state.pool.head_dim
        self.v_head_dim = state.pool.head_dim
        self._finalize_allocation_log(size)

    def get_kv_size_bytes(self):
        p = self.state.pool
        return p.k_rows.numel() * p.k_rows.element_size(), p.v_rows.numel() * p.v_rows.element_size()

    def _no_dense(self, *_a, **_k):
        raise NotImplementedError(
            "the fairkv KV pool is ragged per (request, layer, KV head): it has no dense per-layer "
            "buffer; only the fairkv attention backend can read or write it")

    get_key_buffer = get_value_buffer = get_kv_buffer = set_kv_buffer = _no_dense


class FairKVPrefillBudget(PrefillBudget):
    """One admission pass, charged per TP rank in pages, by what requests will *keep* (SGLang's
    ``PrefillBudget`` interface).

    SGLang's budget is one number of tokens, charged the dense prompt plus ``max_new_tokens``. Here a
    request is charged per rank (its segments there; with Fair-Copying that depends on which replicas
    serve it) and by its compressed size (issue 14):

    * **now** (this step's peak, against ``remaining_current``): a chunk that does not end the prompt
      grows every segment dense; the last chunk compresses as it goes (the backend allocates each
      layer's pages when that layer runs and returns the tail right after compressing it), so its
      peak is the kept layers before the running one, that layer dense and the prefix of the layers
      after it (:func:`~sglang_fairkv.compress.footprint.last_chunk_peak`) -- the *transient reserve*,
      returned when the forward ends;
    * **total** (what it holds afterwards, against ``remaining_total``): a completing request its kept
      rows plus ``max_new_tokens`` decode rows per segment
      (:func:`~sglang_fairkv.compress.footprint.kept_pages`, exact at TP 1, a per-rank bound for AdaKV
      under a plan); a request whose prompt continues in later chunks the peak of its last chunk when
      the next chunk ends the prompt (the rest fits a pass's chunk), else its whole prompt dense
      (earlier chunks stay dense until the last one: SnapKV/AdaKV score with the final window).

    Both are net of the pages the request already holds. While SGLang's ``PrefillAdder`` considers a
    request the ``current_req`` hook (:func:`sglang_fairkv.integration.adder_request_hook`) names it; the
    budget previews its replicas (:meth:`ReplicaAssigner.choose`, counting the requests already taken
    in this pass), checks both charges against every rank's free pages from the ledger, and on
    ``reserve`` records the choice (``state.planned``) so the ``prepare_for_extend`` hook admits the
    request with exactly the replicas it was charged for. Every rank runs the same pass on the same
    ledger, so all take the same decision. SGLang's scalar offsets (running requests' future decode
    scaled by ``new_token_ratio``, mixed decode tokens) stay in tokens and are converted with the
    expected price (:attr:`GroupLedger.rows_per_token`): one decode token is one row per segment for
    stock and fairkv alike. Without a named request (other SGLang paths) the scalar rule applies, with
    two pages of slack per request.
    """

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
        self._charge_memo: dict[tuple, tuple] = {}  # see _charges
        self.state.planned.clear()  # choices of an earlier pass that were never admitted
        self.state.planned_charge.clear()

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
        if idx is not None and st.admitted.get(int(idx)) == req.rid:
            return st.ledger.owner[int(idx)], st.ledger.length[int(idx)], None
        if self._preview is not None and self._preview[0] == req.rid:
            chosen = self._preview[1]
        else:
            chosen = st.assigner.choose(max(1, len(req.full_untruncated_fill_ids)), self._pending)
            self._preview, self._preview_roomiest = (req.rid, chosen), False
        return st.assigner.owners_for(chosen), 0, chosen

    def _charges(self, req, extend_tokens: int, decode_tokens: int, owner=None):
        """int64 ``[tp]`` each, net of what the request holds now: ``(now, total, after)`` -- this step's
        peak, what it holds once its prompt is done (with ``decode_tokens`` decode rows per segment) or,
        for a chunk that does not end the prompt, the whole prompt dense, and what it holds when this
        step's forward ends; then ``held`` (pages it holds now, ``[tp]``) and whether the chunk ends
        the prompt. ``extend_tokens``: this chunk (``s + extend_tokens`` reaching the prompt
        length is the last chunk). ``owner``: replicas to price instead of the request's own."""
        own0, start, _ = self._segments(req)
        own = np.asarray(own0 if owner is None else owner, dtype=np.int64)
        n = max(1, len(req.full_untruncated_fill_ids))
        s = int(torch.as_tensor(start).max())  # before compression every segment has the prefix length
        # the same request is priced several times per pass (fits, credit, reserve): once per key
        key = (n, s, extend_tokens, decode_tokens, _max_new_tokens(req), own.tobytes())
        hit = self._charge_memo.get(key)
        if hit is None:
            hit = self._charge_memo[key] = self._price(n, s, extend_tokens, decode_tokens, own, req)
        return hit

    def _price(self, n: int, s: int, extend_tokens: int, decode_tokens: int, own: np.ndarray, req):
        """:meth:`_charges` of a prompt of ``n`` tokens holding ``s`` now, its segments as ``own`` says."""
        st, lg = self.state, self.state.ledger
        tp, P = lg.tp, lg.page_size
        held = footprint.dense_pages(s, own, tp, P)  # [tp, L]
        held_sum = held.sum(axis=1)
        if s + extend_tokens < n:  # not the last chunk: dense now, the whole prompt dense until the last
            after = footprint.dense_pages(s + extend_tokens, own, tp, P).sum(axis=1)
            # SGLang passes no decode for a chunk that does not end the prompt; reserve the request's own
            # (the last chunk will need it, and nothing admitted meanwhile may take it)
            decode = max(decode_tokens, _max_new_tokens(req))
            nxt = s + extend_tokens
            if self.chunk_size is not None and n - nxt <= self.chunk_size:
                # the next chunk ends the prompt (SGLang gives a continuation a whole chunk): its peak
                # from this chunk's end, compressing as it goes
                peak = footprint.last_chunk_peak(footprint.kept_pages(st.cfg, n, 0, own, tp, P, st.head_budgets),
                                                 footprint.dense_pages(n, own, tp, P),
                                                 footprint.dense_pages(nxt, own, tp, P))
            else:  # later chunks stay dense until the last: bounded by the whole prompt dense
                peak = footprint.dense_pages(n, own, tp, P).sum(axis=1)
            total = np.maximum(peak, footprint.kept_pages(st.cfg, n, decode, own, tp, P, st.head_budgets).sum(axis=1))
            now = after
        else:
            kept = footprint.kept_pages(st.cfg, n, 0, own, tp, P, st.head_budgets)
            after = kept.sum(axis=1)
            now = footprint.last_chunk_peak(kept, footprint.dense_pages(n, own, tp, P), held)
            total = footprint.kept_pages(st.cfg, n, decode_tokens, own, tp, P, st.head_budgets).sum(axis=1)
        t = lambda x: torch.from_numpy(np.asarray(x - held_sum, dtype=np.int64))  # noqa: E731
        return t(now), t(total), t(after), torch.from_numpy(held_sum), s + extend_tokens >= n

    def _roomiest_choice(self, req, extend_tokens: int, decode_tokens: int, left_now: torch.Tensor,
                         left_total: torch.Tensor) -> np.ndarray:
        """Replicas chosen for room instead of shares: each copied head (in order) on the replica whose
        rank has the most pages left after this request's other segments (priced as if every segment
        cost the same). Deterministic (ties to the lower-listed replica), so every rank picks the same."""
        lg, asg = self.state.ledger, self.state.assigner
        base = asg.base_owner
        now, total, *_ = self._charges(req, extend_tokens, decode_tokens, owner=base)
        room = torch.minimum(left_now - now, left_total - total)
        one = np.zeros_like(base)  # the mean cost of a segment: every segment on rank 0
        now1, total1, *_ = self._charges(req, extend_tokens, decode_tokens, owner=one)
        per_segment = -(-int(max(now1[0], total1[0])) // one.size)
        chosen = np.empty(len(asg.copied_ranks), dtype=np.int64)
        for i, ranks in enumerate(asg.copied_ranks):
            j = int(np.argmax(room[torch.as_tensor(ranks)].numpy()))
            chosen[i] = j
            room[int(ranks[j])] -= per_segment
        return chosen

    def _fits(self, req, extend_tokens: int, decode_tokens: int) -> bool:
        """Whether ``req`` fits every rank, this step's peak and what it holds afterwards. A new request
        whose share-keeping replicas do not fit (e.g. all its copies on one rank) is given the roomiest
        replicas instead, so a request that fits the group is never refused for its replica choice (an
        idle server must admit it)."""
        left_now, left_total = self._pages_left(current=True), self._pages_left(current=False)

        def ok() -> bool:
            now, total, *_ = self._charges(req, extend_tokens, decode_tokens)
            return bool((now <= left_now).all() and (total <= left_total).all())

        if ok():
            return True
        _, _, chosen = self._segments(req)
        if chosen is None or not self.state.assigner.num_copied_heads:
            return False
        alt = self._roomiest_choice(req, extend_tokens, decode_tokens, left_now, left_total)
        self._preview, self._preview_roomiest = (req.rid, alt), True
        if ok():
            return True
        self._preview = None
        return False

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
        now = self._charges(req, ext, 0)[0]
        lg = self.state.ledger
        held = lg.rows_per_token > 0
        now_tokens = float((now[held].to(torch.float64) * lg.page_size / lg.rows_per_token[held]).max()) \
            if bool(held.any()) else 0.0
        self._credit = max(0, int(paged_input - math.ceil(now_tokens)))
        return True

    def available_chunk_tokens(self, chunk_limit):
        req = self.current_req
        if req is None:
            return super().available_chunk_tokens(chunk_limit)
        owner, start, _ = self._segments(req)
        lg = self.state.ledger
        s = int(torch.as_tensor(start).max())
        rest = len(req.full_untruncated_fill_ids) - s
        if rest <= chunk_limit and self._fits(req, rest, 0):
            return chunk_limit  # the last chunk fits (compressing as it goes)
        segs = lg.segments_per_rank(owner)
        left = self._pages_left(current=True)
        held = segs > 0
        if not bool(held.any()):
            return chunk_limit
        pages_each = int((left[held] // segs[held]).min())
        fit = (-(-s // lg.page_size) + pages_each) * lg.page_size - s
        available = min(chunk_limit, fit, rest - 1) if rest > 1 else min(chunk_limit, fit)
        return available if available > 0 else chunk_limit  # a continuation must progress (as SGLang)

    def reserve(self, extend_input_len, max_new_tokens, *, extra_tokens=0, chunk_limit=None,
                is_chunked_continuation=False):
        req = self.current_req
        if req is None:
            slack = 2 * self.state.pool.page_size
            return super().reserve(extend_input_len, max_new_tokens, extra_tokens=extra_tokens + slack,
                                   chunk_limit=chunk_limit, is_chunked_continuation=is_chunked_continuation)
        _, _, chosen = self._segments(req)
        now, total, after, held, last = self._charges(req, extend_input_len, max_new_tokens)
        self.pages_current += now
        self.pages_total += total
        self.pages_after += after
        self._credit = 0
        # SGLang's extra (page alignment it already counts, request-slot/mamba reserves: 0 here)
        extra = max(0, extra_tokens + self.page_size)
        self.current_offset += extra
        self.total_offset += extra
        if last:  # what it holds for the rest of its life (shown as the mix in /server_info)
            life = (total + held).numpy()
            if chosen is None:
                self.state.charged[int(req.kv.req_pool_idx)] = life
            else:
                self.state.planned_charge[req.rid] = life
        if chosen is not None:  # a new request: these replicas are the ones it was charged for
            self.state.planned[req.rid] = chosen
            self.state.roomiest_admissions += int(self._preview_roomiest)
            weight = max(1, len(req.full_untruncated_fill_ids))
            for i, j in enumerate(chosen):
                self._pending[i][j] += weight
        self._preview = None


def _max_new_tokens(req) -> int:
    """The decode tokens SGLang reserves for ``req`` when its last chunk is admitted (its remaining
    ``max_new_tokens``, clipped as SGLang clips it)."""
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    sp = getattr(req, "sampling_params", None)
    if sp is None or sp.max_new_tokens is None:
        return 0
    return max(0, min(sp.max_new_tokens - len(getattr(req, "output_ids", ()) or ()), CLIP_MAX_NEW_TOKENS))


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
        if int(self.state.ledger.pages_used().sum()) or self.state.admitted:
            errs.append(f"fairkv ledger not empty at idle: pages per rank "
                        f"{self.state.ledger.pages_used().tolist()}, {len(self.state.admitted)} admitted")
        return errs

    def clear(self):
        super().clear()
        if hasattr(self, "state"):
            for r in list(self.state.admitted):
                self.state.release(r)
            self.state.pool.clear()


def build_state(cfg: CompressConfig, head_budgets: torch.Tensor | None, *, rank_plan: RankPlan,
                max_total_tokens: int, rows_per_token_budget: int, page_size: int, head_dim: int,
                max_reqs: int, max_context: int, dtype: torch.dtype, device: str, group: int = 1,
                profile_path: str | None = None, metadata_in_budget: bool = True) -> FairKVState:
    """The pool in the bytes SGLang's stock pool would take for ``max_total_tokens`` tokens.

    ``rows_per_token_budget``: the rows per token SGLang sized this rank's KV memory for (layers x its
    stock per-rank KV heads), so every plan gets the same bytes per rank. Out of those bytes come the
    segment tables (``[max_reqs, layers, heads, ceil(max_context / P) + 1]`` page ids, lengths, owner
    bits) and on CUDA the decode kernel's static scratch; the rest is pages (plus reserved page 0).
    The pool's head dimension is the largest number of heads the plan gives this rank in any layer.
    ``metadata_in_budget=False`` (unit tests of admission arithmetic only): every byte is pages.
    """
    from ..kernels.ragged_decode import DecodeWorkspace

    num_layers = rank_plan.plan.num_layers
    row_bytes = 2 * head_dim * torch.empty(0, dtype=dtype).element_size()
    budget = max_total_tokens * rows_per_token_budget * row_bytes
    on_cuda = torch.device(device).type == "cuda"

    def sizes(heads: int) -> tuple[int, int, int, dict]:
        """(pages, table bytes, scratch bytes, workspace kwargs) of a rank whose pool holds ``heads``."""
        table = RaggedKVPool.table_bytes(max_reqs=max_reqs, num_layers=num_layers, num_kv_heads=heads,
                                         max_context=max_context, page_size=page_size)
        kw = dict(max_segments=max_reqs * heads, pool_rows=max_total_tokens * rows_per_token_budget,
                  group=group, head_dim=head_dim)
        scratch = DecodeWorkspace.bytes_for(**kw) if on_cuda else 0
        if not metadata_in_budget:
            return -(-budget // (page_size * row_bytes)), 0, 0, kw
        return (budget - table - scratch) // (page_size * row_bytes), table, scratch, kw

    # every rank's pool size (its tables depend on the heads the plan gives it), known on every rank:
    # the ledger must price each rank against that rank's own pages
    heads_of = [max(1, RankPlan(rank_plan.plan, q, rank_plan.num_q_heads).max_local_heads)
                for q in range(rank_plan.tp)]
    pages_of = [sizes(h)[0] for h in heads_of]
    heads = heads_of[rank_plan.rank]
    num_pages, table, scratch, ws_kw = sizes(heads)
    if min(pages_of) < 2:
        raise ValueError(
            f"sglang-fairkv: the KV budget ({budget / 2**20:.1f} MB for {max_total_tokens} tokens) does not "
            f"hold the segment page table ({table / 2**20:.1f} MB for {max_reqs} requests x {num_layers} "
            f"layers x {heads} heads x context {max_context}) and the decode scratch "
            f"({scratch / 2**20:.1f} MB): lower --max-running-requests or --context-length, or give more "
            "memory (--mem-fraction-static / --max-total-tokens)")
    pool = RaggedKVPool(num_pages=int(num_pages) + 1, page_size=page_size, num_layers=num_layers,
                        num_kv_heads=heads, head_dim=head_dim, max_reqs=max_reqs, max_context=max_context,
                        dtype=dtype, device=device)
    workspace = DecodeWorkspace.create(**ws_kw, device=device) if on_cuda else None
    ledger = GroupLedger(tp=rank_plan.tp, max_reqs=max_reqs, num_layers=num_layers,
                         num_kv_heads=rank_plan.plan.num_kv_heads, page_size=page_size,
                         usable_pages=[int(n) for n in pages_of],
                         rows_per_token=rank_plan.expected_rows_per_token())
    assert int(ledger.usable[rank_plan.rank]) == pool.usable_pages
    target = torch.full((max_reqs,), -1, dtype=torch.int64)
    logger.info("sglang-fairkv: rank %d/%d ragged KV pool %d pages x %d rows (%.1f MB K+V; of the %.1f MB "
                "budget, %.1f MB page table for %d requests x context %d, %.1f MB decode scratch), plan %s "
                "(KV heads per layer here %s), compression %s",
                rank_plan.rank, rank_plan.tp, pool.usable_pages, page_size,
                2 * pool.k_rows.numel() * pool.k_rows.element_size() / 2**20, budget / 2**20,
                table / 2**20, max_reqs, pool.max_context, scratch / 2**20, rank_plan.plan.strategy,
                rank_plan.heads_per_layer(), cfg.to_json())
    return FairKVState(pool=pool, cfg=cfg, head_budgets=head_budgets, target_len=target,
                       rank_plan=rank_plan, ledger=ledger, assigner=ReplicaAssigner(rank_plan.plan),
                       profile_path=profile_path, workspace=workspace)
