"""The ragged pool's bookkeeping against a plain-Python model of the same segments (no SGLang)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import numpy as np

from sglang_fairkv_kernels import paged_decode_torch
from helpers.decode_reference import paged_decode_reference
from sglang_fairkv.kv.ragged_pool import RaggedKVPool, RaggedPoolFull

L, H, D = 3, 2, 8


def make_pool(pages=200, page_size=4, max_reqs=6, max_context=64):
    return RaggedKVPool(num_pages=pages, page_size=page_size, num_layers=L, num_kv_heads=H, head_dim=D,
                        max_reqs=max_reqs, max_context=max_context, dtype=torch.float32)


def segment_values(pool, r, layer, head):
    n = int(pool.seg_len_host[r, layer, head])
    return pool.k_rows[pool.rows_of(r, layer, head, torch.arange(n))][:, 0].tolist()


def assert_device_tables_match_host(pool):
    """After a flush the device tables equal the host mirrors (lengths, owner bits, and every page of
    every live segment)."""
    pool.flush()
    assert pool.pending_writes() == 0
    assert np.array_equal(pool.seg_len.numpy(), pool.seg_len_host)
    assert np.array_equal(pool.active.numpy(), pool.active_host)
    live = np.arange(pool.max_pages)[None, None, None, :] < (-(-pool.seg_len_host // pool.page_size))[..., None]
    assert np.array_equal(pool.seg_pages.numpy()[live], pool.seg_pages_host[live])


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
            act = pool.active_host[r]
            old = int(pool.seg_len_host[r][act].max()) if act.any() else 0
            new = old + rng.randrange(1, 9)
            if new > 60:
                continue
            pool.extend([r], [new])
            pool.flush()
            live.add(r)
            for l in range(L):
                rows = pool.rows_at(torch.tensor([r]), l, H, torch.arange(old, new))[0]  # [H, new - old]
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
            need = pool.decode_pages_needed(batch)
            free_before, uploads = pool.free_page_count(), pool.uploads
            rows, lens = pool.append(np.array(batch), torch.tensor(batch))
            rows = rows.permute(1, 0, 2)  # [b, L, H]
            assert free_before - pool.free_page_count() == need
            assert pool.uploads - uploads <= 1  # one host-to-device copy per decode step
            assert np.array_equal(lens.numpy(), pool.seg_len_host[batch])
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
        assert int(np.abs(pool.seg_len_host[~pool.active_host]).sum()) == 0  # inactive segments stay empty
        in_use = sum(math.ceil(len(v) / pool.page_size) for v in model.values())
        assert pool.used_pages() == in_use
        assert pool.used_tokens() == sum(len(v) for v in model.values())
        if rng.random() < 0.1:
            assert_device_tables_match_host(pool)
    assert_device_tables_match_host(pool)
    for r in list(live):
        pool.free(r)
    assert pool.used_pages() == 0 and pool.used_tokens() == 0
    assert_device_tables_match_host(pool)
    assert sorted(pool.free_pages.tolist()) == list(range(1, pool.num_pages))  # no page lost or doubled


def test_pool_full_raises_and_loses_nothing():
    pool = make_pool(pages=1 + L * H * 2, page_size=4)  # room for 8 tokens per segment
    pool.set_active(1)
    pool.set_active(2)
    pool.extend([1], [8])
    with pytest.raises(RaggedPoolFull):
        pool.extend([2], [1])
    assert pool.used_pages() == L * H * 2
    pool.free(1)
    assert pool.free_page_count() == pool.usable_pages


def test_rows_at_and_torch_decode_match_reference():
    """The CPU decode path reads the page table (``rows_at``) and equals an fp64 per-segment loop,
    with a compacted and an emptied segment and requests in an order unlike their slots."""
    torch.manual_seed(0)
    pool = make_pool(pages=400, page_size=4)
    pool.k_rows.normal_()
    pool.v_rows.normal_()
    reqs = [4, 1, 3]
    for r in reqs:
        pool.set_active(r)
    pool.extend(reqs, [30, 17, 5])
    pool.compact(3, 1, [torch.tensor([0, 4]), torch.tensor([], dtype=torch.int64)])  # an empty segment
    pool.flush()
    idx = torch.tensor(reqs)
    for layer in range(L):
        T = int(pool.seg_len_host[reqs, layer].max())
        rows = pool.rows_at(idx, layer, H, torch.arange(T))
        for b, r in enumerate(reqs):
            for h in range(H):
                n = int(pool.seg_len_host[r, layer, h])
                assert rows[b, h, :n].tolist() == pool.rows_of(r, layer, h, torch.arange(n)).tolist()
        q = torch.randn(len(reqs), H, 3, D)
        got = paged_decode_torch(q, pool.k_rows, pool.v_rows, pool.seg_pages, pool.seg_len, idx, layer, 0.35,
                                 pool.page_size, max_len=T)
        ref = paged_decode_reference(q, pool.k_rows, pool.v_rows, pool.seg_pages, pool.seg_len, idx, layer,
                                     pool.page_size, 0.35)
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
        if layer == 1:
            assert got[2, 1].abs().sum() == 0  # the emptied segment gives zeros


def test_queued_writes_last_one_wins_and_one_upload():
    """A freed slot reused before the next flush: the device tables end with the new request's
    values (duplicates resolved in queue order), in one upload."""
    pool = make_pool()
    pool.set_active(2)
    pool.extend([2], [9])
    pool.flush()
    pool.free(2)
    mask = np.zeros((L, H), dtype=bool)
    mask[0, 1] = mask[2, 0] = True
    pool.set_active(2, mask)
    pool.extend([2], [5])
    before = pool.uploads
    pool.flush()
    assert pool.uploads == before + 1
    assert_device_tables_match_host(pool)
    assert pool.seg_len[2].tolist() == [[0, 5], [0, 0], [5, 0]]


def test_host_bookkeeping_refuses_device_tensors():
    pool = make_pool()
    pool.set_active(1)
    with pytest.raises(TypeError, match="device tensor"):
        pool.extend(torch.tensor([1], device="meta"), [3])


def test_table_bytes_match_allocation():
    pool = make_pool(max_reqs=5, max_context=100, page_size=8)
    got = pool.seg_pages.numel() * 4 + pool.seg_len.numel() * 4 + pool.active.numel()
    assert RaggedKVPool.table_bytes(max_reqs=5, num_layers=L, num_kv_heads=H, max_context=100,
                                    page_size=8) == got
