"""The fairkv state of one scheduler process, shared by the allocator, the backend and the hooks.

:class:`FairKVState` composes the pieces and keeps the request lifecycle consistent across them:
admission (replicas chosen, ledger and pool segments activated) and release (every segment freed,
the row reset). The pieces themselves know nothing of SGLang: the ragged pool, the TP group's page
ledger, the replica assigner, the request table and the live-traffic record. :func:`build_state`
sizes the pool from the KV bytes SGLang budgets (:mod:`~sglang_fairkv.kv.sizing`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import env
from ..compress import footprint
from ..compress.policy import CompressConfig
from ..kv import admission
from ..kv.group_ledger import GroupLedger
from ..kv.prefix_tier import TierBlocks
from ..kv.ragged_pool import RaggedKVPool
from ..kv.request_table import RequestTable
from ..kv.sizing import rank_pool_sizes
from ..placement.replicas import ReplicaAssigner
from ..placement.runtime import RankPlan
from ..telemetry.live_traffic import LiveTraffic
from ..telemetry.report import UsageLog

logger = logging.getLogger(__name__)


@dataclass
class FairKVState:
    """Everything per scheduler process that the allocator, the backend and the hooks share."""

    pool: RaggedKVPool
    cfg: CompressConfig
    head_budgets: torch.Tensor | None
    rank_plan: RankPlan
    ledger: GroupLedger
    assigner: ReplicaAssigner
    requests: RequestTable | None = None
    #: when set, one JSON line per finished prompt (kept tokens per head) is appended here
    profile_path: str | None = None
    #: the Triton decode kernel's static bounds and scratch (CUDA), counted in the KV budget
    workspace: object | None = None
    #: requests admitted with the roomiest replicas because the share rule's choice did not fit
    roomiest_admissions: int = 0
    #: forward batches whose host indices had to be read back from the device (should stay 0)
    host_index_readbacks: int = 0
    #: the served traffic as the plan sees it (live profile, balance since start, drift report)
    traffic: LiveTraffic | None = None
    usage_log: UsageLog = field(default_factory=UsageLog)
    #: the data-parallel replica this process serves (SGLang's ``--dp-size``; None without DP): each
    #: replica is a TP group of its own with its own pool, ledger and replica assigner
    dp_rank: int | None = None
    #: plan switches so far (``GET /fairkv/plan``); 0: the plan the server started with
    plan_epoch: int = 0
    #: a plan switch armed (:mod:`~sglang_fairkv.serving.control_plane`): new prompts wait until it commits
    pending_switch: dict | None = None
    #: plan switches so far and the last one (``/server_info``, Prometheus; :mod:`.control_plane`)
    replan_log: dict = field(default_factory=lambda: {
        "switches": 0, "auto_switches": 0, "last": None, "kv_bytes_moved_total": 0, "weight_bytes_moved_total": 0,
        "segments_moved_total": 0, "last_auto_gain": None, "last_auto_skipped": None,
        "last_switch_at": -math.inf, "last_auto_attempt_at": -math.inf})
    #: scheduler iterations counted by the automatic re-plan (the same on every rank)
    auto_iter: int = 0
    #: every rank's pool head slots (fixed at start: the tables' width); a plan may not need more
    pool_heads_of: list[int] | None = None
    #: the dense prefix tier's block ids (None: no tier; see :mod:`~sglang_fairkv.kv.prefix_tier`)
    tier: TierBlocks | None = None
    #: the most pages the tier keeps once its prefills are done, per rank (int64 [tp]; eviction beyond)
    tier_cap_pages: torch.Tensor | None = None
    #: decode-time compression counters (``/server_info`` ``decode_compress``): passes, request compressions,
    #: rows evicted (group-wide) since start
    decode_stats: dict = field(default_factory=lambda: {"passes": 0, "request_compressions": 0,
                                                        "rows_evicted_total": 0})
    #: decode-time compression's query ring ``[max_reqs, L, W, Hq, D]`` (``--kv-decode-compress``; else None)
    decode_ring: torch.Tensor | None = None
    #: the radix tree of this process (set by :class:`~sglang_fairkv.serving.prefix_cache.FairKVRadixCache`)
    tree: object | None = None
    #: what the pool means in requests (:func:`~sglang_fairkv.compress.footprint.capacity_summary`, plus the
    #: compression in words): start-up line and ``/server_info``
    capacity: dict = field(default_factory=dict)
    #: prefix-tier counters: hits, tokens reused, prompts inserted, tier pages evicted (shown in /server_info)
    tier_stats: dict = field(default_factory=lambda: {"hits": 0, "hit_tokens": 0, "inserted_prompts": 0,
                                                      "evicted_blocks": 0})

    def __post_init__(self):
        plan = self.rank_plan.plan
        if self.requests is None:
            self.requests = RequestTable(self.pool.max_reqs, self.rank_plan.tp)
        if self.traffic is None:
            self.traffic = _new_traffic(plan)
        self._local_heads = self.rank_plan.local_heads
        self.heads_per_layer = [len(h) for h in self._local_heads]

    # ---- request lifecycle (the same events in the same order on every rank) --------------------
    def admit(self, req_pool_idx: int, rid: str, weight: int) -> None:
        """A request's first prefill chunk: choose its replicas (same choice on every rank), record
        who holds each segment in the ledger, and activate this rank's segments. Idempotent."""
        reqs = self.requests
        if req_pool_idx in reqs.admitted:
            return
        self.assigner.admit(rid, max(1, weight), reqs.planned.pop(rid, None))
        owner = self.assigner.owners(rid)  # [L, KV]
        self.ledger.admit(req_pool_idx, owner)
        mask = np.zeros((self.pool.num_layers, self.pool.num_kv_heads), dtype=np.bool_)
        for l, heads in enumerate(self._local_heads):
            mask[l, :len(heads)] = owner[l, heads] == self.rank_plan.rank
        self.pool.set_active(req_pool_idx, mask)
        reqs.admit(req_pool_idx, rid)

    def record_prompt(self, req_pool_idx: int, prompt_len: int) -> None:
        """A prompt is done: its kept tokens per (layer, KV head) of the whole model (the ledger: this
        rank's own segments are its pool's lengths) go to the live profile (when it was compressed) and
        to the profile file (if on)."""
        kept = self.ledger.length[req_pool_idx].numpy()
        if footprint.compresses(self.cfg, prompt_len):
            self.traffic.record(kept, prompt_len)
        if self.profile_path is None:
            return
        with open(self.profile_path, "a") as f:
            f.write(json.dumps({"req_pool_idx": req_pool_idx, "prompt_len": prompt_len,
                                "kept": kept.tolist()}) + "\n")

    def sample_decode_balance(self, req_pool_idx: np.ndarray) -> None:
        """A decode step of these requests (host ``[b]``) is being launched: every few steps the
        per-layer balance of the rows it reads is sampled (host, ``[b, L, KV]`` of the ledger)."""
        self.traffic.decode_step(lambda: self.ledger.layer_loads(req_pool_idx))

    # ---- the dense prefix tier (same events in the same order on every rank) ------------------------
    def tier_alloc_chunk(self, req_pool_idx: int, start: int, n: int) -> np.ndarray:
        """Tier tokens for positions ``[start, start + n)`` of a request's prefill chunk (its own; pages
        on this rank, block count in the ledger). Returns the request's whole tier-token array."""
        reqs = self.requests
        tok = reqs.tier_tok.get(req_pool_idx)
        if tok is None or tok.size != start:
            raise AssertionError(f"fairkv prefix tier: request {req_pool_idx} holds "
                                 f"{None if tok is None else tok.size} tier positions, chunk starts at {start}")
        new, blocks = self.tier.alloc(n)
        self.pool.tier_alloc(blocks)
        reqs.tier_tok[req_pool_idx] = tok = np.concatenate([tok, new])
        return tok

    def tier_release(self, tokens: np.ndarray) -> int:
        """Drop tier tokens (their owner is done with them); frees the blocks left empty. Returns blocks
        freed."""
        freed = self.tier.release(tokens)
        self.pool.tier_free(freed)
        return int(freed.size)

    def tier_begin(self, req_pool_idx: int, prefix_tokens: np.ndarray) -> None:
        """A request's first chunk uses the tier: positions ``[0, m)`` are the matched prefix's tokens
        (owned by the tree, locked by the request until its prompt is inserted)."""
        reqs = self.requests
        reqs.tier_tok[req_pool_idx] = np.asarray(prefix_tokens, dtype=np.int64).copy()
        reqs.tier_own_from[req_pool_idx] = int(prefix_tokens.size)

    def tier_drop_request(self, req_pool_idx: int) -> None:
        """The request is done with the tier without (more of) its prompt going into the tree (abort,
        retract, finish): release the tokens it still owns."""
        reqs = self.requests
        tok = reqs.tier_tok.pop(req_pool_idx, None)
        own = reqs.tier_own_from.pop(req_pool_idx, 0)
        if tok is not None and tok.size > own:
            self.tier_release(tok[own:])

    def release(self, req_pool_idx: int, drop_tier: bool = True) -> int:
        """Free every segment of one request (finish, abort, retract); returns pages freed here.
        ``drop_tier=False``: its own tier tokens stay for the radix tree's checkpoint that follows (the
        tree drops what it does not take, ``FairKVRadixCache.on_release``)."""
        if self.tier is not None and drop_tier:
            self.tier_drop_request(req_pool_idx)
        rid = self.requests.release(req_pool_idx)
        if rid is not None:
            self.assigner.release(rid)
        self.ledger.release(req_pool_idx)
        return self.pool.free(req_pool_idx)

    # ---- views -------------------------------------------------------------------------------
    def host_req_pool_indices(self, forward_batch) -> np.ndarray:
        """int64 host ``req_pool_indices`` of a forward batch without reading the device: SGLang's
        scheduler keeps them (``ScheduleBatch.req_pool_indices_cpu``); ForwardBatch carries them for
        prefill, and for decode a hook adds them. Otherwise they are read back (a sync on CUDA; counted
        in ``host_index_readbacks``, which the end-to-end tests expect at 0)."""
        cpu = getattr(forward_batch, "req_pool_indices_cpu", None)
        if cpu is not None:
            return cpu.numpy().astype(np.int64, copy=False)
        self.host_index_readbacks += 1
        if self.host_index_readbacks == 1:
            logger.warning("sglang-fairkv: a forward batch without SGLang's host req_pool_indices; "
                           "reading them back from the device (a host sync per step)")
        return forward_batch.req_pool_indices.cpu().numpy().astype(np.int64)

    def switch_plan(self, plan, running: "RunningUnderB | None" = None) -> None:
        """Serve ``plan`` from now on. Without ``running`` the pool and the ledger are empty (a drained
        switch); with it, the running requests' segments have been moved to their owners under ``plan``
        (a migrate switch, :mod:`~sglang_fairkv.kv.segment_mover`) and their ledger owners, charges and
        replica choices follow. This rank's plan, its heads per layer, the replica assigner, the prefix
        tier's price per block (one page per held (layer, head); the tier must be empty), the live
        traffic's baseline and the capacity figures follow; the epoch counts the switch. The ledger's token
        price (``rows_per_token``) stays the start plan's: SGLang copied the scalar capacity it implies into
        its components at start-up."""
        if running is None and (self.requests.admitted or self.pool.used_pages()):
            raise RuntimeError("fairkv: a plan switch needs an empty pool (requests still hold segments)")
        if self.tier is not None and self.tier.blocks_used:
            raise RuntimeError("fairkv: a plan switch needs an empty prefix tier (flush the radix tree first)")
        self.rank_plan = RankPlan(plan, self.rank_plan.rank, self.rank_plan.num_q_heads)
        self._local_heads = self.rank_plan.local_heads
        self.heads_per_layer = [len(h) for h in self._local_heads]
        self.assigner = ReplicaAssigner(plan)
        reqs = self.requests
        reqs.planned.clear()  # replica choices priced under the old plan (the next admission pass redoes them)
        reqs.planned_charge.clear()
        reqs.planned_tier.clear()
        if running is not None:
            for i, r in enumerate(running.req_idx.tolist()):
                own = running.owner[i]
                chosen = self.assigner.choice_for(own)
                if (chosen < 0).any():
                    raise AssertionError(f"fairkv: request {reqs.admitted[r]} owned by a rank without a replica")
                self.assigner.admit(reqs.admitted[r], max(1.0, float(running.weights[i])), chosen)
                self.ledger.owner[r] = torch.from_numpy(np.ascontiguousarray(own, dtype=np.int64))
                reqs.charged[r] = running.charged[i]
            # the decode query ring holds each running request's queries per *local* head slot, which the
            # switch re-laid: their intervals restart, so no compression scores with queries of other heads
            reqs.decode_steps[running.req_idx] = 0
        if self.tier is not None:
            self.pool.enable_tier(self.tier.num_blocks, self.heads_per_layer)
            self.ledger.attach_tier(self.tier, _tier_pages_per_block(
                [RankPlan(plan, q, self.rank_plan.num_q_heads) for q in range(plan.tp)]))
        self.traffic = _new_traffic(plan)
        self.plan_epoch += 1
        # what the pool means under the new plan (the start-up capacity line's figures, in /server_info)
        self.capacity = _capacity(self.cfg, self.assigner, self.ledger.usable.numpy(), self.pool.page_size,
                                  self.head_budgets)
        from .server_plan import set_current_plan

        set_current_plan(plan)  # the one owner of the current plan: what the model's layers are re-sliced to

    def local_heads(self, layer: int) -> list[int]:
        """Global KV head ids this rank holds in ``layer`` (its local heads ``0..n-1`` in order)."""
        return self._local_heads[layer]

    @property
    def rows_per_token(self) -> int:
        """KV rows this rank holds per prompt token (its heads summed over layers)."""
        return sum(self.heads_per_layer)

    def decode_pages_to_come(self, new_token_ratio: float) -> torch.Tensor:
        """int64 ``[tp]``: pages each rank still owes the admitted requests past their prompt
        (:func:`~sglang_fairkv.kv.admission.decode_pages_to_come`, a copy counted where its replica is)."""
        reqs = self.requests
        idx = reqs.admitted_indices()
        idx = idx[reqs.prompt_done[idx]]
        held = self.ledger.pages_per_request(idx).numpy() if idx.size else np.zeros((0, self.ledger.tp), np.int64)
        return admission.decode_pages_to_come(reqs.charged[idx], held, reqs.fixed_length[idx], new_token_ratio)

    def kept_and_transient_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``[tp]`` each: KV rows of requests whose prompt is done (compressed, plus decode) and of
        requests still in prefill (dense chunks awaiting their last one), from the ledger."""
        done = self.requests.prompt_done
        return self.ledger.rows_where(done).numpy(), self.ledger.rows_where(~done).numpy()

    def admissible_when_empty(self) -> int | None:
        """Requests the empty pool would admit at the mix now running (None with nothing admitted)."""
        reqs = self.requests
        return admission.admissible_when_empty(reqs.charged[reqs.admitted_indices()], self.ledger.usable.numpy())

    def ledger_mismatch(self) -> str | None:
        """None when the ledger's page count for this rank equals the real pool's, else why not."""
        mine = int(self.ledger.pages_used()[self.rank_plan.rank])
        if mine != self.pool.used_pages():
            return (f"fairkv ledger says rank {self.rank_plan.rank} uses {mine} pages, its pool "
                    f"uses {self.pool.used_pages()}")
        tier = int(self.ledger.tier_pages()[self.rank_plan.rank])
        if tier != self.pool.tier_used_pages:
            return (f"fairkv ledger says rank {self.rank_plan.rank}'s prefix tier holds {tier} pages, "
                    f"its pool {self.pool.tier_used_pages}")
        return None


@dataclass(frozen=True)
class RunningUnderB:
    """The running requests of a migrate switch under the new plan: ``req_idx`` int64 ``[R]`` (admission
    order), ``weights`` float64 ``[R]`` (the assigner's), ``owner`` int64 ``[R, L, KV]`` (each segment's rank
    under the new plan), ``charged`` int64 ``[R, tp]`` (pages each rank now holds for it for its life)."""

    req_idx: np.ndarray
    weights: np.ndarray
    owner: np.ndarray
    charged: np.ndarray


def _new_traffic(plan) -> LiveTraffic:
    """The served-traffic record of a plan (live profile, balance since start, drift report)."""
    return LiveTraffic(plan.num_layers, plan.num_kv_heads, window=env.live_window(),
                       sample_every=env.balance_sample_steps(), drift_interval_s=env.drift_interval_s())


def _tier_pages_per_block(plans: list[RankPlan]) -> list[int]:
    """Pages one prefix-tier block takes on each rank: one per (layer, KV head) the rank holds, copies in."""
    return [sum(len(h) for h in p.local_heads) for p in plans]


def _capacity(cfg: CompressConfig, assigner: ReplicaAssigner, usable_pages, page_size: int,
              head_budgets: torch.Tensor | None) -> dict:
    """What the pool means in requests under the assigner's plan (a copied head counted on its first
    replica: a request takes one replica of each), with the compression in words."""
    first_owner = assigner.owners_for(np.zeros(assigner.num_copied_heads, dtype=np.int64))
    fit = footprint.capacity_summary(cfg, first_owner, np.asarray(usable_pages, dtype=np.int64), page_size,
                                     head_budgets=head_budgets)
    fit["compression"] = footprint.describe(cfg)
    return fit


def build_state(cfg: CompressConfig, head_budgets: torch.Tensor | None, *, rank_plan: RankPlan,
                max_total_tokens: int, rows_per_token_budget: int, page_size: int, head_dim: int,
                max_reqs: int, max_context: int, dtype: torch.dtype, device: str, group: int = 1,
                store_dtype: torch.dtype | None = None,
                profile_path: str | None = None, metadata_in_budget: bool = True,
                dp_rank: int | None = None, prefix_tier: float = 0.0, head_slots: int | None = None) -> FairKVState:
    """The pool in the bytes SGLang's stock pool would take for ``max_total_tokens`` tokens
    (:func:`~sglang_fairkv.kv.sizing.rank_pool_sizes`; the pool's head dimension is the most heads the
    plan gives this rank in any layer), the TP group's ledger pricing every rank against that rank's own
    pages, and the rest of the state. Raises ValueError when the budget cannot hold the tables.
    ``dtype``: SGLang's KV dtype (the model's: what the budget is sized in); ``store_dtype``: the rows'
    (fp8 with ``--kv-cache-dtype fp8_*``; default ``dtype``): the same bytes hold more rows.
    ``head_slots``: KV head slots every rank's pool reserves at least (``--fairkv-replan-head-slots``: the
    tables' width, fixed for the server's life, bounds the heads a later plan may give a rank in a layer)."""
    num_layers = rank_plan.plan.num_layers
    store_dtype = dtype if store_dtype is None else store_dtype
    budget_row_bytes = 2 * head_dim * torch.empty(0, dtype=dtype).element_size()
    row_bytes = 2 * head_dim * torch.empty(0, dtype=store_dtype).element_size()
    on_cuda = torch.device(device).type == "cuda"
    target = None
    if on_cuda:
        from sglang_fairkv_kernels import target_programs_for

        target = target_programs_for(device)

    def sizes(heads: int):
        return rank_pool_sizes(max_total_tokens=max_total_tokens, rows_per_token_budget=rows_per_token_budget,
                               row_bytes=budget_row_bytes, store_row_bytes=row_bytes, heads=heads, page_size=page_size, num_layers=num_layers,
                               max_reqs=max_reqs, max_context=max_context, group=group, head_dim=head_dim,
                               on_cuda=on_cuda, metadata_in_budget=metadata_in_budget,
                               target_programs=target)

    # every rank's pool size (its tables depend on the heads the plan gives it), known on every rank:
    # the ledger must price each rank against that rank's own pages
    plans = [RankPlan(rank_plan.plan, q, rank_plan.num_q_heads) for q in range(rank_plan.tp)]
    reserve = min(int(head_slots or 0), rank_plan.plan.num_kv_heads)
    heads_of = [max(1, p.max_local_heads, reserve) for p in plans]
    pages_of = [sizes(h).pages for h in heads_of]
    heads = heads_of[rank_plan.rank]
    mine = sizes(heads)
    # decode-time compression's query ring ``[max_reqs, L, W, group x heads, D]`` (model dtype): each rank's
    # out of its own pages (its head slots)
    ring_pages = [0] * rank_plan.tp
    if cfg.decode_enabled:
        from ..attention.decode_compress import ring_bytes

        page_bytes = page_size * row_bytes
        for q in range(rank_plan.tp):
            rb = ring_bytes(max_reqs=max_reqs, num_layers=num_layers, window=cfg.decode_window,
                            q_heads=group * heads_of[q], head_dim=head_dim, dtype=dtype)
            ring_pages[q] = -(-rb // page_bytes)
            pages_of[q] = int(pages_of[q]) - ring_pages[q]
    # the dense prefix tier (``prefix_tier`` > 0): a block is one page per (layer, KV head) a rank holds;
    # its block table ``[blocks, L, H]`` (int32) comes out of each rank's pages, and the block count is
    # the same on every rank (tier tokens are group-wide ids): the tightest rank's
    tier_ppb = _tier_pages_per_block(plans)
    num_blocks = 0
    if prefix_tier > 0:
        page_bytes = page_size * row_bytes
        for q in range(rank_plan.tp):
            nb = int(pages_of[q]) // max(1, tier_ppb[q])
            cost = -(-RaggedKVPool.tier_table_bytes(nb, num_layers, heads_of[q]) // page_bytes)
            pages_of[q] = int(pages_of[q]) - cost
        num_blocks = min(int(pages_of[q]) // max(1, tier_ppb[q]) for q in range(rank_plan.tp))
    if min(pages_of) < 2:
        raise ValueError(
            f"sglang-fairkv: the KV budget ({mine.budget_bytes / 2**20:.1f} MB for {max_total_tokens} tokens) "
            f"does not hold the segment page table ({mine.table_bytes / 2**20:.1f} MB for {max_reqs} requests x "
            f"{num_layers} layers x {heads} heads x context {max_context}) the decode scratch "
            f"({mine.scratch_bytes / 2**20:.1f} MB), the allocator's logical slots "
            f"({mine.allocator_bytes / 2**20:.1f} MB) and the decode query ring "
            f"({ring_pages[rank_plan.rank] * page_size * row_bytes / 2**20:.1f} MB, --kv-decode-window): lower "
            "--max-running-requests or --context-length, or give more memory (--mem-fraction-static / "
            "--max-total-tokens)")
    decode_ring = None
    if cfg.decode_enabled:
        decode_ring = torch.zeros(max_reqs, num_layers, cfg.decode_window, group * heads, head_dim, dtype=dtype,
                                  device=device)
    pool = RaggedKVPool(num_pages=int(pages_of[rank_plan.rank]) + 1, page_size=page_size, num_layers=num_layers,
                        num_kv_heads=heads, head_dim=head_dim, max_reqs=max_reqs, max_context=max_context,
                        dtype=store_dtype, device=device)
    workspace = None
    if on_cuda:
        from sglang_fairkv_kernels import DecodeWorkspace

        workspace = DecodeWorkspace.create(**mine.workspace_kw, device=device)
    ledger = GroupLedger(tp=rank_plan.tp, max_reqs=max_reqs, num_layers=num_layers,
                         num_kv_heads=rank_plan.plan.num_kv_heads, page_size=page_size,
                         usable_pages=[int(n) for n in pages_of],
                         rows_per_token=rank_plan.expected_rows_per_token())
    assert int(ledger.usable[rank_plan.rank]) == pool.usable_pages
    tier = None
    cap = None
    if num_blocks > 0:
        pool.enable_tier(num_blocks, [len(h) for h in rank_plan.local_heads])
        assert pool.tier_pages_per_block == tier_ppb[rank_plan.rank]
        tier = TierBlocks(num_blocks, page_size)
        ledger.attach_tier(tier, tier_ppb)
        cap = torch.floor(ledger.usable.to(torch.float64) * prefix_tier).to(torch.int64)
    logger.info("sglang-fairkv: %srank %d/%d ragged KV pool %d pages x %d rows of %s (%.1f MB K+V; of the %.1f MB "
                "budget, %.1f MB page table for %d requests x context %d, %.1f MB decode scratch, %.1f MB "
                "logical slots), plan %s "
                "(KV heads per layer here %s), compression %s",
                f"DP replica {dp_rank}, " if dp_rank is not None else "", rank_plan.rank, rank_plan.tp, pool.usable_pages,
                page_size, str(store_dtype).removeprefix("torch."),
                2 * pool.k_rows.numel() * pool.k_rows.element_size() / 2**20, mine.budget_bytes / 2**20,
                mine.table_bytes / 2**20, max_reqs, pool.max_context, mine.scratch_bytes / 2**20,
                mine.allocator_bytes / 2**20,
                rank_plan.plan.strategy, rank_plan.heads_per_layer(), cfg.to_json())
    if decode_ring is not None:
        logger.info("sglang-fairkv: rank %d decode query ring %.1f MB (%d pages of the KV budget): %d requests x %d "
                    "layers x the last %d decode steps' queries", rank_plan.rank,
                    decode_ring.numel() * decode_ring.element_size() / 2**20, ring_pages[rank_plan.rank], max_reqs,
                    num_layers, cfg.decode_window)
    assigner = ReplicaAssigner(rank_plan.plan)
    fit = _capacity(cfg, assigner, pages_of, page_size, head_budgets)
    if rank_plan.rank == 0:  # what the pool means, in plain words (once per group)
        logger.info("sglang-fairkv: %sKV compression: %s. KV pool: %d pages x %d rows per rank = %d tokens of "
                    "dense context. A request of %d prompt + %d output tokens holds %d pages compressed vs %d "
                    "dense: about %d such requests at once vs %d with stock KV. Prefix cache: %s.",
                    f"DP replica {dp_rank}: " if dp_rank is not None else "", fit["compression"],
                    pool.usable_pages, page_size, fit["dense_tokens"], fit["prompt_len"], fit["output_len"],
                    fit["pages_compressed"], fit["pages_dense"], fit["requests_compressed"],
                    fit["requests_dense"], f"on (up to {prefix_tier:.0%} of the pages)" if num_blocks > 0 else "off")
    return FairKVState(pool=pool, cfg=cfg, head_budgets=head_budgets, rank_plan=rank_plan, ledger=ledger,
                       assigner=assigner, profile_path=profile_path, workspace=workspace,
                       dp_rank=dp_rank, tier=tier, tier_cap_pages=cap, capacity=fit, pool_heads_of=list(heads_of),
                       decode_ring=decode_ring)
