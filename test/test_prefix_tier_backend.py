"""The dense prefix tier below the server: its block bookkeeping and the backend's prefill through it.

Reference: the same backend without a tier (the classic path, itself checked against kvpress and fp64
attention elsewhere). A prompt prefilled through the tier -- whole, chunked, or over a prefix another
request left there -- must give the same attention outputs for the positions it computes and leave
exactly the same kept rows in its segments; the ledger must price the tier's pages as the pool holds
them, and everything must go back when the owners let go.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.backend_harness import Geometry, extend_batch, layer, make_backend

from sglang_fairkv.kv.prefix_tier import TierBlocks

GEO = Geometry(layers=3, q_heads=4, kv_heads=2, head_dim=16, max_reqs=8, max_context=512, max_total_tokens=4096)


def test_tier_blocks_count_live_tokens_and_free_empty_blocks():
    t = TierBlocks(num_blocks=6, page_size=4)
    a, blocks_a = t.alloc(10)  # 3 blocks, the last one half used
    assert blocks_a.tolist() == [0, 1, 2] and a.tolist() == list(range(10))
    b, blocks_b = t.alloc(3)  # a chunk starts a fresh block
    assert blocks_b.tolist() == [3] and b.tolist() == [12, 13, 14]
    assert t.blocks_used == 4 and t.live.tolist()[:4] == [4, 4, 2, 3]
    assert t.release(a[:6]).tolist() == [0]  # block 1 keeps two live tokens
    assert t.release(a[6:]).tolist() == [1, 2]
    with pytest.raises(RuntimeError, match="released twice"):
        t.release(a[:1])
    assert t.blocks_used == 1
    with pytest.raises(RuntimeError, match="need 6 blocks, 5 free"):
        t.alloc(21)
    c, blocks_c = t.alloc(20)  # every free block, reused in stack order
    assert sorted(blocks_c.tolist()) == [0, 1, 2, 4, 5] and t.blocks_used == 6
    assert sorted(t.release(np.concatenate([b, c])).tolist()) == [0, 1, 2, 3, 4, 5]


def _inputs(n: int, seed: int):
    """q / k / v per layer for ``n`` positions, as a model's attention layers would pass them."""
    gen = torch.Generator().manual_seed(seed)
    D = GEO.head_dim
    return [(torch.randn(n, GEO.q_heads * D, generator=gen), torch.randn(n, GEO.kv_heads * D, generator=gen),
             torch.randn(n, GEO.kv_heads * D, generator=gen)) for _ in range(GEO.layers)]


def _prefill(backend, r: int, pre: int, ext: int, target: int, qkv) -> list[torch.Tensor]:
    """One chunk ``[pre, pre + ext)`` of request ``r`` (its q / k / v rows of those positions)."""
    fb = extend_batch(backend, [r], [pre], [ext], [target])
    backend.init_forward_metadata(fb)
    return [backend.forward_extend(q[pre:pre + ext], k[pre:pre + ext], v[pre:pre + ext], layer(GEO, lid), fb)
            for lid, (q, k, v) in enumerate(qkv)]


def _segments(backend, r: int):
    """Every segment of request ``r``: (length, K rows, V rows) per (layer, head)."""
    p = backend.pool
    out = []
    for lid in range(GEO.layers):
        for h in range(GEO.kv_heads):
            n = int(p.seg_len_host[r, lid, h])
            rows = p.rows_of(r, lid, h, torch.arange(n))
            out.append((n, p.k_rows[rows].clone(), p.v_rows[rows].clone()))
    return out


@pytest.mark.parametrize("method,ratio", [("snapkv", 0.5), ("adakv", 0.6), ("none", None)])
@pytest.mark.parametrize("chunks", [1, 2])
def test_prefill_through_the_tier_and_over_a_reused_prefix_equals_the_classic_path(method, ratio, chunks):
    n_a, m, n_b = 70, 50, 96  # B reuses A's first 50 positions (its window, 8, is recomputed)
    a_in, b_new = _inputs(n_a, 1), _inputs(n_b, 2)
    # B's inputs: A's rows for the shared prefix, its own after (the prefix's K / V are what A computed)
    b_in = [tuple(torch.cat([x[:m], y[m:]]) for x, y in zip(la, lb)) for la, lb in zip(a_in, b_new)]
    classic = make_backend(GEO, method, ratio)
    want_a = _prefill(classic, 0, 0, n_a, n_a, a_in)
    want_b = _prefill(classic, 1, 0, n_b, n_b, b_in)

    tiered = make_backend(GEO, method, ratio, prefix_tier=1.0)
    st = tiered.state
    st.admit(0, "a", n_a)
    st.tier_begin(0, np.zeros(0, dtype=np.int64))
    got_a = _prefill(tiered, 0, 0, n_a, n_a, a_in)
    tok_a = st.requests.tier_tok[0].copy()
    assert tok_a.size == n_a and st.tier.live.sum() == n_a
    st.admit(1, "b", n_b)
    st.tier_begin(1, tok_a[:m])
    bounds = [m, n_b] if chunks == 1 else [m, m + 20, n_b]
    got_b = []
    for lo, hi in zip(bounds, bounds[1:]):
        got_b.append(_prefill(tiered, 1, lo, hi - lo, n_b, b_in))
    got_b = [torch.cat([c[lid] for c in got_b]) for lid in range(GEO.layers)]
    for lid in range(GEO.layers):
        assert torch.allclose(got_a[lid], want_a[lid], atol=1e-6), lid
        assert torch.allclose(got_b[lid], want_b[lid][m:], atol=1e-6), lid  # only the new positions run
    for r in (0, 1):
        for (n0, k0, v0), (n1, k1, v1) in zip(_segments(classic, r), _segments(tiered, r)):
            assert n0 == n1 and torch.equal(k0, k1) and torch.equal(v0, v1)
    if method != "none":
        assert _segments(tiered, 1)[0][0] < n_b  # really compressed
    # the ledger prices the tier as the pool holds it: B's own 46 positions in blocks of 16 (2 chunks:
    # each starts a block), A's 70
    p, lg = tiered.pool, tiered.ledger
    blocks = -(-n_a // 16) + sum(-(-(hi - lo) // 16) for lo, hi in zip(bounds, bounds[1:]))
    assert lg.tier_blocks == blocks and p.tier_used_pages == blocks * GEO.layers * GEO.kv_heads
    assert st.ledger_mismatch() is None
    assert np.array_equal(lg.length[1].numpy(), classic.ledger.length[1].numpy())
    # releases: B drops its own tier positions, A (no tree here) all of its own
    st.release(1)
    assert st.tier.live.sum() == n_a
    st.release(0)
    p.begin_step()
    assert st.tier.live.sum() == 0 and lg.tier_blocks == 0 and p.tier_used_pages == 0
    assert p.used_pages() == 0 and st.ledger_mismatch() is None
