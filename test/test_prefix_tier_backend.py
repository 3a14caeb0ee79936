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
from helpers.backend_harness import Geometry, extend_batch, layer, make_backend, segments, use_varlen

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


@pytest.mark.parametrize("method,ratio", [("snapkv", 0.5), ("adakv", 0.6), ("none", None)])
@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("varlen", [False, True], ids=["per-request", "one-call"])
def test_prefill_through_the_tier_and_over_a_reused_prefix_equals_the_classic_path(method, ratio, chunks, varlen,
                                                                                   monkeypatch):
    """``varlen``: the tiered backend takes the CUDA one-call path (the kernel a CPU stand-in); the
    classic reference stays per request."""
    n_a, m, n_b = 70, 50, 96  # B reuses A's first 50 positions (its window, 8, is recomputed)
    a_in, b_new = _inputs(n_a, 1), _inputs(n_b, 2)
    # B's inputs: A's rows for the shared prefix, its own after (the prefix's K / V are what A computed)
    b_in = [tuple(torch.cat([x[:m], y[m:]]) for x, y in zip(la, lb)) for la, lb in zip(a_in, b_new)]
    classic = make_backend(GEO, method, ratio)
    want_a = _prefill(classic, 0, 0, n_a, n_a, a_in)
    want_b = _prefill(classic, 1, 0, n_b, n_b, b_in)

    tiered = make_backend(GEO, method, ratio, prefix_tier=1.0)
    if varlen:
        use_varlen(tiered, monkeypatch)
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
        for (n0, k0, v0), (n1, k1, v1) in zip(segments(classic, [r]), segments(tiered, [r])):
            assert n0 == n1 and torch.equal(k0, k1) and torch.equal(v0, v1)
    if method != "none":
        assert segments(tiered, [1])[0][0] < n_b  # really compressed
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


def test_radix_tree_nodes_carry_tier_tokens_through_split_evict_cap_and_reset():
    """``FairKVRadixCache`` over SGLang's ``RadixCache`` (inserts as SGLang's checkpoint makes them): a
    node's tier tokens follow its positions when a match splits it, evicting a leaf releases exactly its
    tokens (a block's pages go back with its last token), the cap evicts LRU down to it, and ``reset``
    (``/flush_cache``) releases the rest."""
    from array import array
    from types import SimpleNamespace

    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from sglang_fairkv.serving.prefix_cache import FairKVRadixCache

    st = make_backend(GEO, "snapkv", 0.5, prefix_tier=1.0).state
    freed = []
    alloc = SimpleNamespace(device="cpu", free_segment=lambda v, start_pos=0: freed.append(v))
    tree = FairKVRadixCache(CacheInitParams(disable=False, req_to_token_pool=None,
                                            token_to_kv_pool_allocator=alloc, page_size=1), st)

    def insert(r, ids, prefix_tok):
        st.admit(r, f"r{r}", len(ids))
        st.tier_begin(r, prefix_tok)
        tok = st.tier_alloc_chunk(r, prefix_tok.size, len(ids) - prefix_tok.size)
        tree._pending_tok = tok
        tree.insert(InsertParams(key=RadixKey(array("q", ids)), value=torch.arange(len(ids))))
        tree._pending_tok = None
        st.requests.tier_own_from[r] = len(ids)  # the tree owns them now (as _insert_cache records)
        st.release(r)
        return tok

    a = list(range(1, 41))
    tok_a = insert(0, a, np.zeros(0, dtype=np.int64))
    b = a[:25] + list(range(100, 115))
    m = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", b))))
    assert m.device_prefix_len == 25
    assert np.array_equal(tree.path_tok(m.last_device_node), tok_a[:25])  # the split kept the positions
    tok_b = insert(1, b, tree.path_tok(m.last_device_node))
    assert np.array_equal(tok_b[:25], tok_a[:25]) and st.tier.live.sum() == 40 + 15
    assert st.ledger_mismatch() is None
    pages_per_block = GEO.layers * GEO.kv_heads
    # evict the least recently used leaf (A's tail): its 15 tokens, and the blocks left empty
    assert tree.evict_one() and st.tier.live.sum() == 40
    assert set(np.unique(tok_a[25:] // 16)) - set(np.unique(tok_a[:25] // 16)) <= \
        set(range(st.tier.num_blocks)) - set(np.nonzero(st.tier.live)[0])
    # a cap of one block's pages evicts down to it (LRU), then reset frees all
    st.tier_cap_pages = torch.tensor([pages_per_block])
    tree.enforce_cap()
    assert int(st.ledger.tier_pages()[0]) <= pages_per_block
    tree.reset()
    st.pool.begin_step()
    assert st.tier.live.sum() == 0 and st.tier.blocks_used == 0 and st.pool.tier_used_pages == 0
    assert st.pool.used_pages() == 0 and st.ledger_mismatch() is None
    assert sum(int(v.numel()) for v in freed) == 15 + 25 + 15  # the logical slots of every evicted node


def test_snapkv_prefill_over_a_reused_prefix_is_sync_free():
    """The layers of a SnapKV prefill through the tier (a reused prefix, the chunk's K/V into tier rows,
    attention over them, compression filling the segments) read nothing back from the device: every host
    sync entry point raises inside them (the metadata before them is host work plus one upload)."""
    from helpers.backend_harness import sync_points

    backend = make_backend(GEO, "snapkv", 0.5, prefix_tier=1.0)
    st = backend.state
    a_in = _inputs(60, 3)
    st.admit(0, "a", 60)
    st.tier_begin(0, np.zeros(0, dtype=np.int64))
    _prefill(backend, 0, 0, 60, 60, a_in)
    st.admit(1, "b", 90)
    st.tier_begin(1, st.requests.tier_tok[0][:40])
    b_in = [tuple(torch.cat([x[:40], y[:50]]) for x, y in zip(la, lb)) for la, lb in zip(a_in, _inputs(50, 4))]
    fb = extend_batch(backend, [1], [40], [50], [90])
    backend.init_forward_metadata(fb)
    with sync_points("raise"):
        for lid, (q, k, v) in enumerate(b_in):
            backend.forward_extend(q[40:], k[40:], v[40:], layer(GEO, lid), fb)
    assert 0 < backend.pool.seg_len_host[1].max() < 90  # compressed into its segments
