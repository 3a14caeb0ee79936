"""The admission arithmetic (``sglang_fairkv.kv.admission``, ``kv.sizing``) against brute force.

Each function is checked against an independent computation written here as plainly as possible:
loops over segments and layers, or a search over every candidate, on random inputs."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from sglang_fairkv.compress.policy import CompressConfig
from sglang_fairkv.kv import admission
from sglang_fairkv.kv.ragged_pool import RaggedKVPool
from sglang_fairkv.kv.sizing import rank_pool_sizes


def _pages(rows: int, P: int) -> int:
    return -(-rows // P)


def _brute_charge(kept_rows: int, n: int, s: int, extend: int, decode: int, max_new: int,
                  owner: np.ndarray, tp: int, P: int, chunk_size: int | None):
    """Per-segment, per-layer loops for a method whose every segment keeps ``kept_rows`` (SnapKV at a
    fixed budget): the peak while each layer runs, what is held after, and the life total."""
    L, KV = owner.shape
    held = np.zeros(tp, np.int64)
    for l in range(L):
        for h in range(KV):
            if owner[l, h] >= 0:
                held[owner[l, h]] += _pages(s, P)

    def per_rank(rows_of_layer) -> np.ndarray:  # rows_of_layer(l) -> rows per segment of layer l
        out = np.zeros(tp, np.int64)
        for l in range(L):
            for h in range(KV):
                if owner[l, h] >= 0:
                    out[owner[l, h]] += _pages(rows_of_layer(l), P)
        return out

    def peak_from(prefix: int) -> np.ndarray:  # the last chunk's forward, compressing layer by layer
        best = np.zeros(tp, np.int64)
        for running in range(L):
            now = per_rank(lambda l: kept_rows if l < running else (n if l == running else prefix))
            best = np.maximum(best, now)
        return np.maximum(best, per_rank(lambda l: kept_rows))

    if s + extend < n:
        after = per_rank(lambda l: s + extend)
        if chunk_size is not None and n - (s + extend) <= chunk_size:
            peak = peak_from(s + extend)
        else:
            peak = per_rank(lambda l: n)
        total = np.maximum(peak, per_rank(lambda l: kept_rows + max(decode, max_new)))
        now = after
    else:
        after = per_rank(lambda l: kept_rows)
        now = peak_from(s)
        total = per_rank(lambda l: kept_rows + decode)
    return now - held, total - held, after - held, held


@pytest.mark.parametrize("seed", range(40))
def test_chunk_charge_equals_per_segment_loops(seed):
    rng = random.Random(seed)
    tp, L, KV, P = rng.choice([1, 2, 3]), rng.randint(1, 4), rng.randint(1, 4), rng.choice([1, 4, 16])
    budget, window = rng.randint(4, 64), 4
    cfg = CompressConfig(method="snapkv", budget=budget, window=window)
    n = rng.randint(window + 1, 400)
    s = rng.choice([0, rng.randint(0, n - 1)])
    extend = rng.randint(1, n - s)
    decode, max_new = rng.randint(0, 50), rng.randint(0, 50)
    owner = np.array([[rng.randrange(-1, tp) for _ in range(KV)] for _ in range(L)], dtype=np.int64)
    chunk = rng.choice([None, rng.randint(1, 200)])
    got = admission.chunk_charge(cfg, None, prompt_len=n, held_len=s, extend=extend, decode=decode,
                                 max_new_tokens=max_new, owner=owner, tp=tp, page_size=P, chunk_size=chunk)
    kept = min(n, cfg.n_kept(n)) if n > window and cfg.n_kept(n) < n else n
    now, total, after, held = _brute_charge(kept, n, s, extend, decode, max_new, owner, tp, P, chunk)
    assert got.now.tolist() == now.tolist()
    assert got.total.tolist() == total.tolist()
    assert got.after.tolist() == after.tolist()
    assert got.held.tolist() == held.tolist()
    assert got.last == (s + extend >= n)


@pytest.mark.parametrize("seed", range(20))
def test_roomiest_replicas_is_a_greedy_argmax_over_room(seed):
    rng = random.Random(seed)
    tp = rng.randint(2, 5)
    room = torch.tensor([rng.randint(-5, 30) for _ in range(tp)], dtype=torch.int64)
    copied = [np.array(rng.sample(range(tp), rng.randint(2, tp))) for _ in range(rng.randint(1, 5))]
    per = rng.randint(0, 10)
    before = room.clone()
    got = admission.roomiest_replicas(room, copied, per)
    assert torch.equal(room, before)  # the caller's tensor is not consumed
    left = before.tolist()
    for i, ranks in enumerate(copied):
        best = max(left[q] for q in ranks)
        j = next(k for k, q in enumerate(ranks) if left[q] == best)  # the first of the roomiest
        assert got[i] == j
        left[ranks[j]] -= per


def test_pages_as_tokens_takes_the_dearest_rank_that_holds_heads():
    rpt = torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64)
    assert admission.pages_as_tokens(torch.tensor([4, 100, 4]), rpt, 16) == 32.0  # rank 1 holds nothing
    assert admission.pages_as_tokens(torch.tensor([4, 1, 4]), torch.zeros(3, dtype=torch.float64), 16) == 0.0


@pytest.mark.parametrize("seed", range(60))
def test_chunk_that_fits_is_the_longest_chunk_every_rank_has_pages_for(seed):
    rng = random.Random(seed)
    tp, P = rng.randint(1, 3), rng.choice([1, 4, 16])
    s, rest, limit = rng.randint(0, 100), rng.randint(1, 300), rng.randint(1, 256)
    left = torch.tensor([rng.randint(0, 40) for _ in range(tp)])
    segs = torch.tensor([rng.randint(0, 6) for _ in range(tp)])
    got = admission.chunk_that_fits(held_len=s, rest=rest, chunk_limit=limit, pages_left=left, segments=segs,
                                    page_size=P)

    def fits(c: int) -> bool:
        grow = _pages(s + c, P) - _pages(s, P)
        return all(int(segs[q]) * grow <= int(left[q]) for q in range(tp) if segs[q] > 0)

    cap = min(limit, rest - 1) if rest > 1 else limit
    fitting = [c for c in range(1, cap + 1) if fits(c)]
    if not bool((segs > 0).any()):
        assert got == limit
    else:
        assert got == (max(fitting) if fitting else limit)  # nothing fits: a chunk must still progress


@pytest.mark.parametrize("seed", range(20))
def test_decode_pages_to_come_sums_each_requests_rest(seed):
    rng = random.Random(seed)
    b, tp = rng.randint(0, 6), rng.randint(1, 3)
    charged = np.array([[rng.randint(0, 50) for _ in range(tp)] for _ in range(b)], dtype=np.int64).reshape(b, tp)
    held = np.array([[rng.randint(0, 60) for _ in range(tp)] for _ in range(b)], dtype=np.int64).reshape(b, tp)
    fixed = np.array([rng.random() < 0.3 for _ in range(b)], dtype=np.bool_)
    ratio = rng.choice([-0.5, 0.0, 0.37, 1.0, 1.7])
    got = admission.decode_pages_to_come(charged, held, fixed, ratio)
    want = []
    for q in range(tp):
        acc = 0.0
        for i in range(b):
            r = 1.0 if fixed[i] else min(1.0, max(0.0, ratio))
            acc += max(0, charged[i, q] - held[i, q]) * r
        want.append(math.ceil(acc - 1e-9))
    assert got.tolist() == want


@pytest.mark.parametrize("seed", range(20))
def test_admissible_when_empty_is_the_most_requests_every_rank_holds(seed):
    rng = random.Random(seed)
    n, tp = rng.randint(0, 5), rng.randint(1, 3)
    charged = np.array([[rng.randint(0, 9) for _ in range(tp)] for _ in range(n)], dtype=np.int64).reshape(n, tp)
    usable = np.array([rng.randint(1, 200) for _ in range(tp)])
    got = admission.admissible_when_empty(charged, usable)
    if n == 0 or not charged.any():
        assert got is None
        return
    mean = charged.mean(axis=0)
    k = 0
    while all(mean[q] * (k + 1) <= usable[q] + 1e-9 for q in range(tp) if mean[q] > 0):
        k += 1
    assert got == k


@pytest.mark.parametrize("heads,max_reqs,on_cuda", [(1, 8, False), (3, 64, False), (2, 16, True)])
def test_pool_sizes_spend_the_budget_on_tables_scratch_and_whole_pages(heads, max_reqs, on_cuda):
    """The pages, the tables the real pool allocates, the allocator's extra slots and the scratch fit the
    stock pool's bytes, and one more page would not."""
    P, L, D, row_bytes = 16, 4, 64, 2 * 64 * 2
    sz = rank_pool_sizes(max_total_tokens=4096, rows_per_token_budget=L * heads, row_bytes=row_bytes, heads=heads,
                         page_size=P, num_layers=L, max_reqs=max_reqs, max_context=512, group=4, head_dim=D,
                         on_cuda=on_cuda)
    assert sz.budget_bytes == 4096 * L * heads * row_bytes
    pool = RaggedKVPool(num_pages=2, page_size=P, num_layers=L, num_kv_heads=heads, head_dim=D,
                        max_reqs=max_reqs, max_context=512, dtype=torch.float16)
    real_tables = sum(t.numel() * t.element_size() for t in (pool.seg_pages, pool.seg_len, pool.active))
    assert sz.table_bytes == real_tables
    assert (sz.scratch_bytes > 0) == on_cuda
    assert sz.allocator_bytes == 4096 * (16 * 4 - 8)  # the logical-slot stack beyond the stock free list
    spent = sz.pages * P * row_bytes + sz.table_bytes + sz.scratch_bytes + sz.allocator_bytes
    assert spent <= sz.budget_bytes < spent + P * row_bytes
    free = rank_pool_sizes(max_total_tokens=4096, rows_per_token_budget=L * heads, row_bytes=row_bytes, heads=heads,
                           page_size=P, num_layers=L, max_reqs=max_reqs, max_context=512, group=4, head_dim=D,
                           on_cuda=on_cuda, metadata_in_budget=False)
    assert free.pages == math.ceil(sz.budget_bytes / (P * row_bytes)) and free.table_bytes == 0
