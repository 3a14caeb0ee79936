"""The ragged pool's bookkeeping against a plain-Python model of the same segments (no SGLang)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sglang_fairkv.attention.ragged_torch import ragged_decode_torch
from sglang_fairkv.kernels.ragged_decode import ragged_decode_reference
from sglang_fairkv.kv.ragged_pool import RaggedKVPool, RaggedPoolFull

L, H, D = 3, 2, 8


def make_pool(pages=200, page_size=4, max_reqs=6, max_context=64):
    return RaggedKVPool(num_pages=pages, page_size=page_size, num_layers=L, num_kv_heads=H, head_dim=D,
                        max_reqs=max_reqs, max_context=max_context, dtype=torch.float32)


def segment_values(pool, r, layer, head):
    n = int(pool.seg_len[r, layer, head])
    return pool.k_rows[pool.rows_of(r, layer, head, torch.arange(n))][:, 0].tolist()


def test_random_lifecycle_matches_python_model():
    """extend (chunked) -> compact -> append, interleaved over requests, each request holding a random
    subset of its segments (a FairKV rank: fewer heads in some layers, replicas it does not serve);
    every active segment holds what a list model says, inactive ones stay empty, the pages in use
    are exactly ceil(len/P) per segment, and freeing empties it."""
    rng = random.Random(0)
    pool = make_pool(pages=3000, max_context=256)
    model: dict[tuple[int, int, int], list[float]] = {}
    live: set[int] = set()
    counter = [0.0]

    def val():
        counter[0] += 1
        return counter[0]

    compressed: set[int] = set()
    for _ in range(300):
        op = rng.random()
        r = rng.randrange(1, 6)
        if op < 0.3 and r not in compressed:  # prefill chunk
            if r not in live:
                mask = torch.rand(L, H, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) < 0.7
                pool.set_active(r, mask)
            act = pool.active[r]
            old = int(pool.seg_len[r][act].max()) if bool(act.any()) else 0
            new = old + rng.randrange(1, 9)
            if new > 60:
                continue
            pool.extend(torch.tensor([r]), torch.tensor([new]))
            live.add(r)
            for l in range(L):
                rows = pool.prefix_rows(r, l, new)[:, old:new]
                for h in [h for h in range(H) if act[l, h]]:
                    vals = [val() for _ in range(new - old)]
                    pool.k_rows[rows[h], 0] = torch.tensor(vals)
                    model.setdefault((r, l, h), []).extend(vals)
        elif op < 0.45 and r in live and r not in compressed:  # compress every layer
            for l in range(L):
                kept, heads = [], [h for h in range(H) if (r, l, h) in model]
                for h in heads:
                    n = len(model[(r, l, h)])
                    pos = sorted(rng.sample(range(n), rng.randrange(1, n + 1)))
                    kept.append(torch.tensor(pos))
                    model[(r, l, h)] = [model[(r, l, h)][p] for p in pos]
                pool.compact(r, l, kept, heads)
            compressed.add(r)
        elif op < 0.85 and live and max(len(v) for v in model.values()) < 200:  # decode step
            batch = sorted(rng.sample(sorted(live), rng.randrange(1, len(live) + 1)))
            need = pool.decode_pages_needed(torch.tensor(batch))
            free_before = pool.free_page_count()
            rows = pool.append(torch.tensor(batch))
            assert free_before - pool.free_page_count() == need
            for i, rr in enumerate(batch):
                for l in range(L):
                    for h in range(H):
                        if (rr, l, h) not in model:
                            assert int(rows[i, l, h]) < pool.page_size  # inactive: the sink page
                            continue
                        v = val()
                        pool.k_rows[rows[i, l, h], 0] = v
                        model[(rr, l, h)].append(v)
        elif r in live:  # finish
            pages = pool.free(r)
            expect = sum(math.ceil(len(model.pop((r, l, h))) / pool.page_size)
                         for l in range(L) for h in range(H) if (r, l, h) in model)
            assert pages == expect
            live.discard(r)
            compressed.discard(r)
        # invariants
        for (rr, l, h), vals in model.items():
            assert segment_values(pool, rr, l, h) == vals
        assert int(pool.seg_len[~pool.active].abs().sum()) == 0  # inactive segments stay empty
        in_use = sum(math.ceil(len(v) / pool.page_size) for v in model.values())
        assert pool.used_pages() == in_use
        assert pool.used_tokens() == sum(len(v) for v in model.values())
    for r in list(live):
        pool.free(r)
    assert pool.used_pages() == 0 and pool.used_tokens() == 0
    assert sorted(pool.free_pages.tolist()) == list(range(1, pool.num_pages))  # no page lost or doubled


def test_pool_full_raises_and_loses_nothing():
    pool = make_pool(pages=1 + L * H * 2, page_size=4)  # room for 8 tokens per segment
    pool.set_active(1)
    pool.set_active(2)
    pool.extend(torch.tensor([1]), torch.tensor([8]))
    with pytest.raises(RaggedPoolFull):
        pool.extend(torch.tensor([2]), torch.tensor([1]))
    assert pool.used_pages() == L * H * 2
    pool.free(1)
    assert pool.free_page_count() == pool.usable_pages


def test_flat_segments_and_torch_decode_match_reference():
    torch.manual_seed(0)
    pool = make_pool(pages=400, page_size=4)
    pool.k_rows.normal_()
    pool.v_rows.normal_()
    reqs = torch.tensor([1, 3, 4])
    for r in reqs.tolist():
        pool.set_active(r)
    pool.extend(reqs, torch.tensor([17, 5, 30]))
    pool.compact(3, 1, [torch.tensor([0, 4]), torch.tensor([], dtype=torch.int64)])  # an empty segment
    for layer in range(L):
        indptr, rows = pool.flat_segments(reqs, layer)
        lens = pool.seg_len[reqs, layer].reshape(-1)
        assert indptr.tolist() == [0, *torch.cumsum(lens, 0).tolist()]
        for s, (r, h) in enumerate([(r, h) for r in reqs.tolist() for h in range(H)]):
            n = int(pool.seg_len[r, layer, h])
            assert rows[indptr[s]:indptr[s + 1]].tolist() == pool.rows_of(r, layer, h, torch.arange(n)).tolist()
        q = torch.randn(len(reqs) * H, 3, D)
        got = ragged_decode_torch(q, pool.k_rows, pool.v_rows, indptr, rows, 0.35)
        ref = ragged_decode_reference(q.double(), pool.k_rows.double(), pool.v_rows.double(), indptr, rows, 0.35)
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    indptr, rows = pool.flat_segments(reqs, 1)
    q = torch.randn(len(reqs) * H, 3, D)
    assert ragged_decode_torch(q, pool.k_rows, pool.v_rows, indptr, rows, 1.0)[3].abs().sum() == 0
