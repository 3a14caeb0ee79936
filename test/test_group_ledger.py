"""The TP group's page ledger against real per-rank ragged pools, and AdaKV split over ranks.

No SGLang, no processes: each "rank" is a RaggedKVPool holding the segments a FairKV plan and the
replica assigner give it; the ledger (one copy, as every rank keeps one) must report every rank's
pages exactly, and the exchange-based AdaKV selection must equal the single-rank one.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from sglang_fairkv.compress.budgets import select_adakv
from sglang_fairkv.compress.policy import CompressConfig, kept_for_layer
from sglang_fairkv.compress.snapkv import SnapKVScorer
from sglang_fairkv.kv.group_ledger import GroupLedger
from sglang_fairkv.kv.ragged_pool import RaggedKVPool
from sglang_fairkv.placement.replicas import ReplicaAssigner
from sglang_fairkv.placement.runtime import RankPlan
from sglang_fairkv.placement.schema import Plan

L, KV, Q, P = 3, 4, 8, 4


def copied_plan(tp=2) -> Plan:
    layers = [[[(0, 1.0)], [(0, 0.3), (1, 0.7)], [(1, 1.0)], [(1, 1.0)]],
              [[(1, 1.0)], [(0, 1.0)], [(0, 1.0)], [(0, 0.5), (1, 0.5)]],
              [[(0, 1.0)], [(0, 1.0)], [(0, 1.0)], [(1, 1.0)]]]  # layer 2: rank 1 holds one head
    return Plan(model="t", tp=tp, num_kv_heads=KV, strategy="fairkv", cost_model={"c_head": 0, "c_token": 1},
                layers=layers, num_q_heads=Q)


def test_ledger_equals_every_rank_pool_through_a_random_lifecycle():
    plan = copied_plan()
    rps = [RankPlan(plan, r, Q) for r in range(plan.tp)]
    pools = [RaggedKVPool(num_pages=4000, page_size=P, num_layers=L, num_kv_heads=rp.max_local_heads,
                          head_dim=2, max_reqs=8, max_context=200, dtype=torch.float32) for rp in rps]
    ledger = GroupLedger(tp=plan.tp, max_reqs=8, num_layers=L, num_kv_heads=KV, page_size=P,
                         usable_pages=pools[0].usable_pages, rows_per_token=rps[0].expected_rows_per_token())
    # expected rows per token: per layer the heads held, a replica at its share
    assert ledger.rows_per_token.tolist() == pytest.approx([1.3 + 2.5 + 3, 2.7 + 1.5 + 1])
    assigner = ReplicaAssigner(plan)
    rng = random.Random(1)
    live: dict[int, str] = {}
    compressed: set[int] = set()
    for step in range(250):
        r = rng.randrange(1, 8)
        op = rng.random()
        if r not in live and op < 0.4:  # admit + first chunk
            rid = f"req{step}"
            n = rng.randrange(5, 60)
            assigner.admit(rid, n)
            owner = assigner.owners(rid)
            ledger.admit(r, owner)
            for q, (rp, pool) in enumerate(zip(rps, pools)):
                mask = torch.zeros(L, pool.num_kv_heads, dtype=torch.bool)
                for layer, heads in enumerate(rp.local_heads):
                    mask[layer, :len(heads)] = torch.from_numpy(owner[layer, heads] == q)
                pool.set_active(r, mask)
                pool.extend(torch.tensor([r]), torch.tensor([n]))
            ledger.extend([r], [n])
            live[r] = rid
        elif r in live and r not in compressed and op < 0.6:  # compress: random kept counts per head
            for layer in range(L):
                counts = torch.zeros(KV, dtype=torch.int64)
                for q, (rp, pool) in enumerate(zip(rps, pools)):
                    own = np.nonzero(pool.active_host[r, layer])[0].tolist()
                    kept = []
                    for j in own:
                        n = int(pool.seg_len_host[r, layer, j])
                        kept.append(torch.tensor(sorted(rng.sample(range(n), rng.randrange(1, n + 1)))))
                        counts[rp.local_heads[layer][j]] = len(kept[-1])
                    pool.compact(r, layer, kept, own)
                ledger.set_kept(r, layer, counts)
            compressed.add(r)
        elif live and op < 0.85:  # decode step of a random batch
            batch = sorted(rng.sample(sorted(live), rng.randrange(1, len(live) + 1)))
            need = ledger.decode_pages_needed(batch)
            for q, pool in enumerate(pools):
                assert pool.decode_pages_needed(torch.tensor(batch)) == int(need[q])
                pool.append(np.array(batch), torch.tensor(batch))
            ledger.append(batch)
            # the rows this decode batch reads per rank and layer (the sampled balance of a step)
            direct_b = [[int(p.seg_len_host[batch, l].sum()) for l in range(L)] for p in pools]
            assert ledger.layer_loads(np.array(batch)).tolist() == direct_b
        elif r in live:  # release
            for pool in pools:
                pool.free(r)
            ledger.release(r)
            assigner.release(live.pop(r))
            compressed.discard(r)
        assert ledger.pages_used().tolist() == [p.used_pages() for p in pools]
        assert ledger.rows_used().tolist() == [p.used_tokens() for p in pools]
        # per-layer attention load: the rows each rank's pool holds in that layer, computed directly
        direct = np.array([[int(p.seg_len_host[:, l].sum()) for l in range(L)] for p in pools])
        assert ledger.layer_loads().tolist() == direct.tolist()
        mx = direct.max(axis=0)
        bal = np.where(mx > 0, direct.mean(axis=0) / np.maximum(mx, 1), 1.0)
        assert ledger.layer_balance().tolist() == pytest.approx(bal.tolist())
        want = direct.mean(axis=0).sum() / mx.sum() if mx.sum() else 1.0
        assert ledger.attention_busy_rate() == pytest.approx(want)
        # per-request pages per rank and rows of a request subset: from each rank's pool directly
        ids = np.arange(8)
        per_req = [[int(((p.seg_len_host[r] + P - 1) // P).sum()) for p in pools] for r in ids]
        assert ledger.pages_per_request(ids).tolist() == per_req
        subset = np.array([rng.random() < 0.5 for _ in ids])
        rows = [int(p.seg_len_host[subset].sum()) for p in pools]
        assert ledger.rows_where(subset).tolist() == rows
        free_tokens = [math.floor(p.free_page_count() * P / rpt) for p, rpt in zip(pools, ledger.rows_per_token)]
        assert ledger.token_capacity_free() == min(free_tokens)
    for r in list(live):
        for pool in pools:
            pool.free(r)
        ledger.release(r)
    assert ledger.pages_used().tolist() == [0, 0] and ledger.memory_busy_rate() == 1.0
    assert ledger.attention_busy_rate() == 1.0 and ledger.layer_loads().sum() == 0


def test_adakv_split_over_ranks_equals_one_rank():
    """Heads of a layer spread over 3 ranks (with a window longer than the per-head budget, where the
    window columns' padding matters): exchanging scores gives exactly the single-rank kept sets."""
    torch.manual_seed(0)
    G, D, S, W = 2, 16, 90, 16
    q = torch.randn(KV * G, W, D)
    k = torch.randn(KV, S, D)
    for budget in (6, 30):
        cfg = CompressConfig(method="adakv", budget=budget, window=W)
        want = kept_for_layer(cfg, 0, L, q, k)
        scorer = SnapKVScorer(window=W, kernel=cfg.kernel)
        parts = {0: [2], 1: [0, 3], 2: [1]}  # rank -> its KV heads
        local_scores = {r: scorer.score(q[torch.tensor([h * G + g for h in hs for g in range(G)])], k[hs])
                        for r, hs in parts.items()}

        def gather(scores, ids):  # what the all-reduce assembles: every rank's rows in place
            full = torch.zeros(KV, S)
            for r, hs in parts.items():
                full[hs] = local_scores[r]
            return full

        for r, hs in parts.items():
            qs = q[torch.tensor([h * G + g for h in hs for g in range(G)])]
            got = kept_for_layer(cfg, 0, L, qs, k[hs], head_ids=hs, gather_scores=gather)
            for h, pos in zip(hs, got):
                assert pos.tolist() == want[h].tolist(), (budget, r, h)
        # without the exchange a rank's own top-k differs (the test can see a missing exchange)
        alone = select_adakv(local_scores[1], math.floor(budget), cfg.alpha)
        assert any(a.tolist() != want[h].tolist() for h, a in zip(parts[1], alone))


def test_rank_plan_views():
    plan = copied_plan()
    rp0, rp1 = RankPlan(plan, 0, Q), RankPlan(plan, 1, Q)
    assert rp0.local_heads == [[0, 1], [1, 2, 3], [0, 1, 2]]
    assert rp1.local_heads == [[1, 2, 3], [0, 3], [3]]
    assert rp1.max_local_heads == 3 and rp0.group_size == 2
    idx = rp1.local_index()
    assert idx[1].tolist() == [0, -1, -1, 1]
    assert np.array_equal(rp0.rows_per_token(), [8, 6])
    assert rp0.expected_rows_per_token().sum() == pytest.approx(L * KV)  # every segment once
