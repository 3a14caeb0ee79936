"""Per-rank admission (``FairKVPrefillBudget``) against the real ragged pools of every rank.

No SGLang server: each "rank" has its own ``FairKVState`` (pool, ledger, replica assigner) built by
``build_state`` exactly as the pool hook builds it; an admission pass calls the budget the way SGLang's
``PrefillAdder`` does (``current_req`` set by the adder hook, ``check_prefill`` then ``reserve``), then
the prefill runs as the backend runs it (``state.admit`` in the prepare hook, ``pool.extend``,
``ledger.extend``). The pools are the reference: the pages each rank's budget charged must be the
pages that rank's pool really took, no pool may run out, and every rank must decide the same.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import numpy as np
import torch

from sglang_fairkv.compress.policy import CompressConfig
from sglang_fairkv.serving.prefill_budget import FairKVPrefillBudget
from sglang_fairkv.serving.state import build_state
from sglang_fairkv.placement.runtime import RankPlan
from sglang_fairkv.placement.schema import Plan

L, KV, Q, P, MAX_REQS = 4, 4, 8, 4, 64


def half_copied_plan() -> Plan:
    """Per layer: head 0 on rank 0, head 1 on rank 1, heads 2 and 3 copied on both (shares vary)."""
    layers = [[[(0, 1.0)], [(1, 1.0)], [(0, 0.5), (1, 0.5)], [(0, 0.3 + 0.1 * l), (1, 0.7 - 0.1 * l)]]
              for l in range(L)]
    return Plan(model="t", tp=2, num_kv_heads=KV, strategy="fairkv", cost_model={"c_head": 0, "c_token": 1},
                layers=layers, num_q_heads=Q)


def rank_states(plan: Plan, max_total_tokens: int):
    return [build_state(CompressConfig(), None, rank_plan=RankPlan(plan, r, Q), max_total_tokens=max_total_tokens,
                        rows_per_token_budget=L * KV // plan.tp, page_size=P, head_dim=2, max_reqs=MAX_REQS,
                        max_context=4096, dtype=torch.float32, device="cpu", metadata_in_budget=False)
            for r in range(plan.tp)]


def fake_req(rid: str, n: int, m: int):
    return SimpleNamespace(rid=rid, full_untruncated_fill_ids=list(range(n)), max_new=m,
                           kv=SimpleNamespace(req_pool_idx=None))


def budget_for(state) -> FairKVPrefillBudget:
    alloc = SimpleNamespace(state=state, page_size=1)
    tree = SimpleNamespace(evictable_size=lambda: 0, supports_mamba=lambda: False)
    return FairKVPrefillBudget(alloc, tree)


def admission_pass(state, queue, chunk: int | None = None):
    """SGLang's adder loop on one rank: returns (admitted [(req, extend_len)], budget)."""
    return admission_pass_with(budget_for(state), queue, chunk)


def run_prefill(states, taken, free_idx: list[int]):
    """prepare_for_extend hook + backend: admit, then grow every held segment on every rank."""
    for req, ext in taken:
        if req.kv.req_pool_idx is None:
            req.kv.req_pool_idx = free_idx.pop()
        r = req.kv.req_pool_idx
        new_len = int(states[0].ledger.length[r].max()) + ext if r in states[0].requests.admitted else ext
        for st in states:
            st.requests.target_len[r] = len(req.full_untruncated_fill_ids)
            st.admit(r, req.rid, len(req.full_untruncated_fill_ids))
            st.pool.extend(torch.tensor([r]), torch.tensor([new_len]))
            st.ledger.extend([r], [new_len])


def pool_pages(states) -> list[int]:
    return [st.pool.used_pages() for st in states]


def release(states, req, free_idx):
    r = req.kv.req_pool_idx
    for st in states:
        st.release(r)
    free_idx.append(r)
    req.kv.req_pool_idx = None


def test_budget_charges_each_rank_its_pages_and_beats_full_price_admission():
    plan = half_copied_plan()
    states = rank_states(plan, max_total_tokens=600)
    usable = states[0].ledger.usable_pages
    n, m = 37, 5
    queue = [fake_req(f"r{i}", n, m) for i in range(200)]
    free_idx = list(range(MAX_REQS - 1, 0, -1))
    passes = [admission_pass(st, queue) for st in states]
    assert [st.roomiest_admissions for st in states] == [0, 0]  # the share rule's choices fitted
    rids = [[req.rid for req, _ in taken] for taken, _ in passes]
    assert rids[0] == rids[1]  # every rank takes the same decision
    taken, budget = passes[0]
    before = pool_pages(states)
    run_prefill(states, taken, free_idx)
    added = [a - b for a, b in zip(pool_pages(states), before)]
    for _, b in passes:  # each rank's budget knew every rank's real pages
        assert b.pages_current.tolist() == added
    assert not states[0].requests.planned and not states[1].requests.planned

    # tight: the next request does not fit with the decode pages reserved for the admitted ones
    nxt = queue[len(taken)]
    owner = states[0].assigner.owners_for(states[0].assigner.choose(n))
    decode_each = math.ceil((n + m) / P) - math.ceil(n / P)  # a segment's pages grow to ceil((n + m) / P)
    for q, st in enumerate(states):
        segs_admitted = sum(int((st.ledger.owner[req.kv.req_pool_idx] == q).sum()) for req, _ in taken)
        need_q = int((torch.as_tensor(owner) == q).sum()) * (math.ceil(n / P) + decode_each)
        st_left = st.pool.free_page_count() - segs_admitted * decode_each
        assert added[q] + segs_admitted * decode_each <= usable  # nothing over-committed
        if need_q > st_left:
            break
    else:
        pytest.fail(f"request {nxt.rid} would have fit on every rank but was refused")

    # the old rule charged every replica in full on each replica's rank: fewer requests
    full = RankPlan(plan, 0, Q).rows_per_token()
    old_tokens = min(usable * P // int(f) for f in full)
    old_admitted = old_tokens // (n + m + 1 + 2 * P)
    assert len(taken) > old_admitted
    assert len(taken) >= 1.2 * old_admitted  # half the heads are copied: ~4/3 more fit

    for req, _ in taken:
        release(states, req, free_idx)
    assert pool_pages(states) == [0, 0] and states[0].ledger.pages_used().tolist() == [0, 0]


def test_random_passes_with_chunks_compression_and_releases_never_overflow():
    plan = half_copied_plan()
    states = rank_states(plan, max_total_tokens=500)
    rng = random.Random(7)
    free_idx = list(range(MAX_REQS - 1, 0, -1))
    waiting = [fake_req(f"q{i}", rng.randrange(3, 300), rng.randrange(0, 40)) for i in range(120)]
    chunked = None
    live = []
    admitted_total = continuations = 0
    for _step in range(60):
        # continuation of the chunked request first (SGLang's add_chunked_req), then new requests
        per_rank = []
        for st in states:
            b = budget_for(st)
            taken = []
            if chunked is not None:
                req, done = chunked
                b.current_req = req
                left = len(req.full_untruncated_fill_ids) - done
                ext = min(left, b.available_chunk_tokens(64))
                b.reserve(ext, req.max_new if ext == left else 0, extra_tokens=-1,
                          is_chunked_continuation=True)
                b.current_req = None
                taken.append((req, ext))
                continuations += st is states[0]
            more, b2 = admission_pass_with(b, waiting[:8], chunk=64 if chunked is None else None)
            per_rank.append((taken + more, b2))
        assert [[r.rid for r, _ in t] for t, _ in per_rank] == [[r.rid for r, _ in t] for t, _ in per_rank[:1]] * 2
        taken, b = per_rank[0]
        before = pool_pages(states)
        run_prefill(states, taken, free_idx)  # raises if a pool runs out of pages
        added = [a - x for a, x in zip(pool_pages(states), before)]
        for _, bq in per_rank:
            assert bq.pages_current.tolist() == added
        chunked = None
        for req, ext in taken:
            if req in waiting:
                waiting.remove(req)
                live.append(req)
                admitted_total += 1
            r = req.kv.req_pool_idx
            done = int(states[0].ledger.length[r].max())
            if done < len(req.full_untruncated_fill_ids):
                chunked = (req, done)
            else:  # prompt done: compress every segment to a random kept count (same on all ranks)
                for layer in range(L):
                    counts = torch.zeros(KV, dtype=torch.int64)
                    for q, st in enumerate(states):
                        own = np.nonzero(st.pool.active_host[r, layer])[0].tolist()
                        kept = []
                        for j in own:
                            keep = sorted(rng.sample(range(done), rng.randrange(1, done + 1)))
                            kept.append(torch.tensor(keep))
                            counts[st.local_heads(layer)[j]] = len(keep)
                        st.pool.compact(r, layer, kept, own)
                    for st in states:
                        st.ledger.set_kept(r, layer, counts)
        for st in states:
            assert st.ledger.pages_used().tolist() == pool_pages(states)
            assert max(pool_pages(states)) <= st.ledger.usable_pages
        # some finish
        for req in list(live):
            if (chunked is None or req is not chunked[0]) and rng.random() < 0.3:
                live.remove(req)
                release(states, req, free_idx)
    assert admitted_total > 20 and continuations >= 5
    for req in live:
        release(states, req, free_idx)
    assert pool_pages(states) == [0, 0]
    assert all(not st.requests.admitted and not st.assigner._owner for st in states)


def admission_pass_with(b: FairKVPrefillBudget, queue, chunk: int | None):
    """:func:`admission_pass` on an existing budget (after a chunk continuation was reserved)."""
    taken = []
    for req in queue:
        n = len(req.full_untruncated_fill_ids)
        b.current_req = req
        ok, _ = b.check_prefill(extend_input_len=n, total_tokens=n + req.max_new, max_new_tokens=req.max_new,
                                input_tokens=n, swa_host_hit_length=0, chunk_limit=chunk)
        if not ok:
            b.current_req = None
            break
        ext = n if chunk is None else min(n, chunk)
        b.reserve(ext, req.max_new if ext == n else 0, extra_tokens=-1)
        b.current_req = None
        taken.append((req, ext))
        if ext < n:
            break  # one chunked request at a time, as SGLang
    return taken, b


def test_idle_server_admits_a_request_whose_share_choice_would_not_fit():
    """Every head copied 50/50: on an idle group the share rule sends a lone request's copies all to
    rank 0 (ties to the lower replica). A prompt that only fits when split must still be admitted,
    with its segments spread so that each rank's pool holds them."""
    layers = [[[(0, 0.5), (1, 0.5)] for _ in range(KV)] for _ in range(L)]
    plan = Plan(model="t", tp=2, num_kv_heads=KV, strategy="fairkv", cost_model={"c_head": 0, "c_token": 1},
                layers=layers, num_q_heads=Q)
    states = rank_states(plan, max_total_tokens=100)
    usable = states[0].ledger.usable_pages
    n, m = 80, 4
    share_owner = states[0].assigner.owners_for(states[0].assigner.choose(n))
    assert (share_owner == 0).all()  # the share rule alone would put the whole request on rank 0
    per_segment = math.ceil((n + m) / P)
    assert L * KV * per_segment > usable >= L * KV // 2 * per_segment
    req = fake_req("long", n, m)
    free_idx = list(range(MAX_REQS - 1, 0, -1))
    passes = [admission_pass(st, [req]) for st in states]
    assert all(len(taken) == 1 for taken, _ in passes)
    run_prefill(states, passes[0][0], free_idx)
    held = [int((st.ledger.owner[req.kv.req_pool_idx] == q).sum()) for q, st in enumerate(states)]
    assert held == [L * KV // 2] * 2
    assert [st.roomiest_admissions for st in states] == [1, 1]  # shown in /server_info
    assert pool_pages(states) == [L * KV // 2 * math.ceil(n / P)] * 2
    # a second such request does not fit next to it
    assert all(not admission_pass(st, [fake_req("second", n, m)])[0] for st in states)
    release(states, req, free_idx)
    assert pool_pages(states) == [0, 0]


def test_page_tables_are_paid_from_the_kv_budget():
    """The segment tables, the allocator's logical slots beyond the stock free list (and on CUDA the
    decode scratch) come out of the bytes SGLang sized for
    ``max_total_tokens``: the pool gets fewer pages, never more memory; too small a budget is refused
    with the flags to change."""
    from sglang_fairkv.kv.ragged_pool import RaggedKVPool

    plan = half_copied_plan()
    kw = dict(rank_plan=RankPlan(plan, 0, Q), rows_per_token_budget=L * KV // 2, page_size=P, head_dim=8,
              max_reqs=MAX_REQS, max_context=512, dtype=torch.float32, device="cpu")
    st = build_state(CompressConfig(), None, max_total_tokens=20000, **kw)
    pool = st.pool
    budget = 20000 * (L * KV // 2) * pool.bytes_per_row()
    table = RaggedKVPool.table_bytes(max_reqs=MAX_REQS, num_layers=L, num_kv_heads=pool.num_kv_heads,
                                     max_context=512, page_size=P)
    from sglang_fairkv.kv.sizing import allocator_extra_bytes

    used = pool.usable_pages * P * pool.bytes_per_row() + table + allocator_extra_bytes(20000)
    assert budget - P * pool.bytes_per_row() < used <= budget
    assert pool.max_context >= 512
    with pytest.raises(ValueError, match="lower --max-running-requests or --context-length"):
        build_state(CompressConfig(), None, max_total_tokens=50, **kw)


def test_ranks_with_different_head_counts_price_each_rank_by_its_own_pool():
    """The page tables come out of the KV bytes, so a rank holding more heads has fewer pages (a plan
    with 3 KV heads at TP 2: 2 + 1). Every rank's ledger must know every rank's own pool size, the
    same on all ranks: a ledger that assumed its own size for all ranks made the ranks admit different
    requests under load (a gloo collective mismatch killed a TP 2 server)."""
    plan = Plan(model="t", tp=2, num_kv_heads=3, strategy="sha", cost_model={"c_head": 0, "c_token": 1},
                layers=[[[(0, 1.0)], [(0, 1.0)], [(1, 1.0)]] for _ in range(L)], num_q_heads=6)
    states = [build_state(CompressConfig(), None, rank_plan=RankPlan(plan, q, 6), max_total_tokens=4000,
                          rows_per_token_budget=L * 2, page_size=P, head_dim=8, max_reqs=MAX_REQS,
                          max_context=2048, dtype=torch.float32, device="cpu") for q in range(2)]
    sizes = [st.pool.usable_pages for st in states]
    assert sizes[0] < sizes[1]  # rank 0's pool holds two heads' tables
    for st in states:
        assert st.ledger.usable.tolist() == sizes
    assert states[0].ledger.capacity_when_empty() == states[1].ledger.capacity_when_empty()
    # the same pass on both ranks takes the same requests, up to the smaller rank's room
    queue = [fake_req(f"u{i}", 200, 8) for i in range(100)]
    passes = [admission_pass(st, queue) for st in states]
    assert [r.rid for r, _ in passes[0][0]] == [r.rid for r, _ in passes[1][0]]
