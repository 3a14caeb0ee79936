"""The page-table decode kernel under TRITON_INTERPRET=1 against an fp64 reference reading the same tables."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

#: the device check of the pool + kernel, dry-run on the CPU here
CHECK_POOL = Path(__file__).resolve().parents[1] / "benchmark" / "device" / "check_pool.py"


@pytest.fixture(scope="module")
def kern():
    """The kernels module, interpreted: conftest.py sets TRITON_INTERPRET=1 before triton loads."""
    mod = importlib.import_module("sglang_fairkv_kernels.ragged_decode")
    assert mod.HAS_TRITON and mod._interpreting(), "TRITON_INTERPRET=1 must be set before import"
    return mod


def naive(q, k_rows, v_rows, seg_pages, seg_len, req_idx, layer, P, scale):
    """Independent fp64 reference: SDPA per segment on rows gathered from the page table."""
    B, Hl, G, D = q.shape
    out = torch.zeros(B, Hl, G, D, dtype=torch.float64)
    for b, r in enumerate(req_idx.tolist()):
        for h in range(Hl):
            n = int(seg_len[r, layer, h])
            if n == 0:
                continue
            rows = torch.tensor([int(seg_pages[r, layer, h, t // P]) * P + t % P for t in range(n)])
            out[b, h] = torch.nn.functional.scaled_dot_product_attention(
                q[b, h].double()[None], k_rows[rows].double()[None], v_rows[rows].double()[None],
                scale=scale)[0]
    return out


def make_tables(seed, lens, *, P=16, R=None, L=2, H=None, layer=1, spare_pages=9):
    """Page tables for ``lens`` [B, Hl] (segment lengths of ``layer``; other layers get random
    lengths too, so reading the wrong layer shows), scattered pages: every page of the pool is given
    out in random order. Returns (seg_pages, seg_len, req_idx, num_pages)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.as_tensor(lens, dtype=torch.int64)
    B, Hl = lens.shape
    H = H or Hl
    R = R or B + 3
    all_lens = torch.randint(0, 50, (R, L, H), generator=g)
    req_idx = torch.randperm(R - 1, generator=g)[:B] + 1  # slot order != req_pool_idx order
    all_lens[req_idx, layer, :Hl] = lens
    all_lens[req_idx, layer, Hl:] = 0
    pages_each = (all_lens + P - 1) // P
    MP = int(pages_each.max()) + 2
    num_pages = int(pages_each.sum()) + 1 + spare_pages
    perm = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()
    seg_pages = torch.zeros(R, L, H, MP, dtype=torch.int32)
    it = iter(perm)
    for idx in torch.nonzero(pages_each).tolist():
        for j in range(int(pages_each[tuple(idx)])):
            seg_pages[tuple(idx) + (j,)] = next(it)
    return seg_pages, all_lens.to(torch.int32), req_idx, num_pages


def skewed(seed, n, mean=600):
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 1.2) * mean  # lognormal, heavy skew
    lens = x.round().clamp(0, 8192).long()
    lens[0], lens[-1] = 0, 8192  # always a zero-length and a maximal segment
    return lens


TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def run(kern, q, seg_pages, seg_len, req_idx, layer, P, num_pages, ws, scale, work=None):
    D = q.shape[-1]
    g = torch.Generator().manual_seed(5)
    k = torch.randn(num_pages * P, D, generator=g).to(q.dtype)
    v = torch.randn(num_pages * P, D, generator=g).to(q.dtype)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)  # poisoned: every entry must be written
    kern.paged_decode(q, k, v, seg_pages, seg_len, req_idx, layer, scale, ws, P, out=out, work=work)
    return out, naive(q, k, v, seg_pages, seg_len, req_idx, layer, P, scale)


@pytest.mark.parametrize("G,D,dtype", [
    (1, 64, torch.float32), (8, 128, torch.float32), (4, 64, torch.float16),
    (3, 128, torch.float16), (8, 64, torch.bfloat16), (2, 128, torch.bfloat16),
])
def test_matches_reference_on_skewed_segments(kern, G, D, dtype):
    seed = G * 1000 + D
    lens = skewed(seed, 8).view(4, 2)
    seg_pages, seg_len, req_idx, num_pages = make_tables(seed, lens)
    ws = kern.DecodeWorkspace.create(max_batch=4, num_heads=2, group=G, head_dim=D, device="cpu", num_layers=2,
                                     target_programs=16)
    q = torch.randn(4, 2, G, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out, ref = run(kern, q, seg_pages, seg_len, req_idx, 1, 16, num_pages, ws, 1 / math.sqrt(D))
    assert torch.isfinite(out).all()
    zero = lens == 0
    assert torch.equal(out[zero], torch.zeros_like(out[zero]))
    err = (out.double() - ref).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err}"


@pytest.mark.parametrize("fp8,dtype,G,D", [
    (torch.float8_e4m3fn, torch.bfloat16, 4, 128), (torch.float8_e5m2, torch.bfloat16, 2, 64),
    (torch.float8_e4m3fn, torch.float16, 3, 64), (torch.float8_e4m3fn, torch.float32, 2, 64),
])
def test_fp8_rows_match_fp64_reference_of_the_same_rows(kern, fp8, dtype, G, D):
    """fp8 rows (``--kv-cache-dtype fp8_*``) holding ``K / k_scale``, ``V / v_scale``: the kernel (and the
    CPU path's torch twin) equals an fp64 reference that dequantises the very same fp8 rows, on skewed
    segments, an empty one (zeros) and a replica slot (empty in the layer: zeros); the scales really
    apply (without them the answer is far off)."""
    from sglang_fairkv_kernels.ragged_torch import paged_decode_torch

    seed = 77 + G * 10 + D
    lens = skewed(seed, 8).view(4, 2)
    lens[2] = 0  # a request whose copied head is served by another replica: nothing here in this layer
    seg_pages, seg_len, req_idx, num_pages = make_tables(seed, lens)
    ws = kern.DecodeWorkspace.create(max_batch=4, num_heads=2, group=G, head_dim=D, device="cpu", num_layers=2,
                                     target_programs=16)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, 2, G, D, generator=g).to(dtype)
    k_scale, v_scale = 0.37, 2.5
    k8 = (torch.randn(num_pages * 16, D, generator=g) * 3 / k_scale).to(fp8)
    v8 = (torch.randn(num_pages * 16, D, generator=g) / v_scale).to(fp8)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    kern.paged_decode(q, k8, v8, seg_pages, seg_len, req_idx, 1, 1 / math.sqrt(D), ws, 16, out=out,
                      k_scale=k_scale, v_scale=v_scale)
    ref = naive(q, k8.double() * k_scale, v8.double() * v_scale, seg_pages, seg_len, req_idx, 1, 16, 1 / math.sqrt(D))
    zero = lens == 0
    assert torch.equal(out[zero], torch.zeros_like(out[zero]))
    err = (out.double() - ref).abs().max().item()
    assert err < TOL[dtype] * 4, f"max abs error {err}"  # outputs scale with v_scale
    twin = paged_decode_torch(q, k8, v8, seg_pages, seg_len, req_idx, 1, 1 / math.sqrt(D), 16,
                              max_len=int(lens.max()), k_scale=k_scale, v_scale=v_scale)
    assert (twin.double() - ref).abs().max().item() < TOL[dtype] * 4
    unscaled = naive(q, k8.double(), v8.double(), seg_pages, seg_len, req_idx, 1, 16, 1 / math.sqrt(D))
    assert (unscaled - ref).abs().max().item() > 0.5


def test_batch_sizes_share_one_static_workspace(kern):
    """Several batch sizes (so several grids), fewer local heads than the table has (a FairKV layer),
    page sizes and piece boundaries, all through one workspace: the scratch and the plan are never
    reallocated."""
    ws = kern.DecodeWorkspace.create(max_batch=8, num_heads=3, group=4, head_dim=64, device="cpu",
                                     min_split=32, block_n=16, target_programs=24, num_layers=3)
    ptrs = (ws.o_part.data_ptr(), ws.lse_part.data_ptr(), ws.plan_off.data_ptr())
    assert [ws.programs_for(b) for b in (1, 3, 8)] == [27, 33, 48]
    for B, Hl, P, lens in ((1, 1, 16, [[700]]), (3, 2, 8, [[128, 127], [129, 0], [1, 256]]),
                           (8, 3, 16, None)):
        if lens is None:
            lens = torch.randint(0, 300, (B, Hl), generator=torch.Generator().manual_seed(B))
        seg_pages, seg_len, req_idx, num_pages = make_tables(B, lens, P=P, H=3, L=3, layer=2)
        q = torch.randn(B, Hl, 4, 64, generator=torch.Generator().manual_seed(B))
        out, ref = run(kern, q, seg_pages, seg_len, req_idx, 2, P, num_pages, ws, 0.125)
        assert (out.double() - ref).abs().max() < 2e-5, (B, Hl, P)
    assert (ws.o_part.data_ptr(), ws.lse_part.data_ptr(), ws.plan_off.data_ptr()) == ptrs


def test_padding_slots_and_replicas_give_zeros(kern):
    """Slots whose segments are empty in the layer (SGLang's padding slot 0, a copied head's requests
    served by the other replica) write zeros, and the other slots' answers are unchanged."""
    lens = torch.tensor([[40, 0], [0, 0], [0, 300], [17, 5]])
    seg_pages, seg_len, req_idx, num_pages = make_tables(11, lens)
    req_idx[1] = 0  # the padding slot: request 0 holds nothing in any layer
    seg_len[0] = 0
    ws = kern.DecodeWorkspace.create(max_batch=4, num_heads=2, group=2, head_dim=64, device="cpu",
                                     min_split=64, block_n=32, num_layers=2)
    q = torch.randn(4, 2, 2, 64, generator=torch.Generator().manual_seed(2))
    out, ref = run(kern, q, seg_pages, seg_len, req_idx, 1, 16, num_pages, ws, 0.1)
    assert torch.equal(out[lens == 0], torch.zeros_like(out[lens == 0]))
    assert (out.double() - ref).abs().max() < 2e-5


def test_q_strided_in_batch_and_heads(kern):
    """q as the backend passes it: a view of ``[b, Hq * D]`` reshaped, and a non-contiguous slice."""
    seg_pages, seg_len, req_idx, num_pages = make_tables(3, [[5, 0], [300, 17]])
    ws = kern.DecodeWorkspace.create(max_batch=2, num_heads=2, group=2, head_dim=64, device="cpu", num_layers=2)
    big = torch.randn(2, 3, 2, 64, generator=torch.Generator().manual_seed(1))
    q = big[:, :2]  # strided in the head axis
    out, ref = run(kern, q, seg_pages, seg_len, req_idx, 1, 16, num_pages, ws, 0.1)
    assert (out.double() - ref).abs().max() < 2e-5


def test_all_segments_empty(kern):
    seg_pages, seg_len, req_idx, num_pages = make_tables(1, [[0, 0], [0, 0]])
    ws = kern.DecodeWorkspace.create(max_batch=2, num_heads=2, group=2, head_dim=64, device="cpu", num_layers=2)
    q = torch.randn(2, 2, 2, 64)
    out, _ = run(kern, q, seg_pages, seg_len, req_idx, 1, 16, num_pages, ws, 0.1)
    assert torch.equal(out, torch.zeros_like(q))


# ---- work follows the tokens, not the pool ---------------------------------------------------
def server_workspace(pool_rows: int, *, max_reqs: int = 64, heads: int = 2, group: int = 4, head_dim: int = 64):
    """The workspace a CUDA server builds (through its sizing, :func:`rank_pool_sizes`) for a pool of
    ``pool_rows`` rows: 1e8 rows is an H200's worth of KV at TP 8 (70B)."""
    from sglang_fairkv.kv.sizing import rank_pool_sizes
    from sglang_fairkv_kernels import DecodeWorkspace

    L = 2
    sz = rank_pool_sizes(max_total_tokens=pool_rows // (L * heads), rows_per_token_budget=L * heads,
                         row_bytes=2 * head_dim * 2, heads=heads, page_size=16, num_layers=L, max_reqs=max_reqs,
                         max_context=8192, group=group, head_dim=head_dim, on_cuda=True)
    assert sz.pages * 16 >= pool_rows // 2  # the budget really is that pool's
    return DecodeWorkspace.create(**sz.workspace_kw, device="cpu")


def work_of(kern, ws, lens, G=4, D=64):
    """Programs launched and loop iterations run (counted by the kernel itself, ``work=``) for one
    decode of a batch with segment lengths ``lens`` [B, H]; the answer checked against fp64."""
    B, H = lens.shape
    seg_pages, seg_len, req_idx, num_pages = make_tables(7, lens, H=H)
    work = torch.full((ws.programs_for(B),), -1, dtype=torch.int32)
    q = torch.randn(B, H, G, D, generator=torch.Generator().manual_seed(0))
    out, ref = run(kern, q, seg_pages, seg_len, req_idx, 1, 16, num_pages, ws, 0.125, work=work)
    assert (out.double() - ref).abs().max() < 2e-5
    assert (work >= 0).all()  # every program of the grid ran and reported
    return work.numel(), int(work.sum())


def test_work_follows_the_batch_not_the_pool(kern):
    """The same batch (8 slots x 2 heads of 100 tokens) decoded with the workspace of a small pool and
    with the one an H200-sized pool (1e8 rows) gets: the same grid, the same iterations (the old
    chunked kernel's grid and trip count grew with the pool: 13.5x the interpreter time). Work measured
    as programs + iterations, as counted by the kernel."""
    lens = torch.full((8, 2), 100)
    small = work_of(kern, server_workspace(64 * 1024), lens)
    huge = work_of(kern, server_workspace(10 ** 8), lens)
    assert sum(huge) <= 2 * sum(small), (small, huge)
    assert small[1] == 8 * 2 * 2  # 100 tokens: two pieces of 64 each, one block each


def test_work_grows_linearly_with_tokens(kern):
    """100 vs 3200 tokens per segment: iterations grow 16x-40x (32x the tokens), programs stay bounded
    by the grid (which depends on the batch only)."""
    ws = server_workspace(10 ** 8)
    p100, it100 = work_of(kern, ws, torch.full((2, 2), 100))
    p3200, it3200 = work_of(kern, ws, torch.full((2, 2), 3200))
    assert p100 == p3200 == ws.programs_for(2)
    assert 16 <= it3200 / it100 <= 40, (it100, it3200)


def test_long_single_segment_spreads_over_many_programs(kern):
    """Batch 1, one long head: the work is split (no program runs the whole segment), each piece's
    iterations are a fair share, and the answer is exact."""
    ws = kern.DecodeWorkspace.create(max_batch=4, num_heads=1, group=2, head_dim=64, device="cpu",
                                     target_programs=16, min_split=128, block_n=64, num_layers=2)
    lens = torch.tensor([[4000]])
    seg_pages, seg_len, req_idx, num_pages = make_tables(3, lens, H=1)
    work = torch.zeros(ws.programs_for(1), dtype=torch.int32)
    q = torch.randn(1, 1, 2, 64, generator=torch.Generator().manual_seed(4))
    out, ref = run(kern, q, seg_pages, seg_len, req_idx, 1, 16, num_pages, ws, 0.125, work=work)
    assert (out.double() - ref).abs().max() < 2e-5
    per = math.ceil(4000 / 16 / 64)  # a piece: ceil(len / 16) tokens rounded up to blocks of 64
    assert (work > 0).sum() == math.ceil(4000 / (per * 64)) and int(work.max()) == per
    assert int(work.sum()) == math.ceil(4000 / 64)  # nothing run twice


def lognormal_batch(seed: int, slots: int, heads: int, median: float = 113, sigma: float = 1.25):
    """Per-head lengths as AdaKV leaves them: lognormal around ``median``, heavy-tailed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.exp(torch.randn(slots, heads, generator=g) * sigma) * median).round().long().clamp(1, 8192)


def test_work_is_balanced_under_per_head_skew(kern):
    """64 slots x 2 heads of lognormal lengths (median ~113, the longest ~20x that): no program runs
    more than twice the even share of the step's iterations (+1 for rounding to blocks), counted by the
    kernel itself; the answer exact. A split count fixed per batch size (the kernel before) ran the
    longest segment in ceil(len / 5 / 64) iterations of one program: several times the even share."""
    ws = kern.DecodeWorkspace.create(max_batch=64, num_heads=2, group=4, head_dim=64, device="cpu", num_layers=2)
    lens = lognormal_batch(0, 64, 2)
    seg_pages, seg_len, req_idx, num_pages = make_tables(7, lens, H=2)
    n_prog = ws.programs_for(64)
    work = torch.full((n_prog,), -1, dtype=torch.int32)
    q = torch.randn(64, 2, 4, 64, generator=torch.Generator().manual_seed(0))
    out, ref = run(kern, q, seg_pages, seg_len, req_idx, 1, 16, num_pages, ws, 0.125, work=work)
    assert (out.double() - ref).abs().max() < 2e-5
    assert (work >= 0).all()
    even = int(work.sum()) / n_prog
    longest = int(lens.max())
    old = math.ceil(math.ceil(longest / min(64, -(-528 // 128))) / 64)  # S = ceil(528 / (64 x 2)) = 5 splits
    print(f"skewed batch: longest segment {longest} tokens (median {int(lens.median())}); longest program "
          f"{int(work.max())} iterations, even share {even:.2f}; fixed splits: {old}")
    assert int(work.max()) <= 2 * even + 1
    assert old > 2 * int(work.max())
    # the plan's own arithmetic: pieces of at most the layer's chunk, none past the grid
    chunk = int(ws.plan_chunk[1])
    assert int(ws.plan_off[1, 127]) <= n_prog
    assert int(ws.plan_off[1, 127]) == sum(-(-int(n) // chunk) for n in lens.flatten())


def test_bad_input_names_the_problem(kern):
    seg_pages, seg_len, req_idx, num_pages = make_tables(1, [[3, 4]])
    ws = kern.DecodeWorkspace.create(max_batch=1, num_heads=2, group=2, head_dim=64, device="cpu", num_layers=2)
    q = torch.randn(1, 2, 2, 64)
    k = torch.randn(num_pages * 16, 64)
    with pytest.raises(ValueError, match=r"k_rows must be \[N, 64\]"):
        kern.paged_decode(q, k[:, :32], k, seg_pages, seg_len, req_idx, 1, 0.1, ws, 16)
    with pytest.raises(ValueError, match="must both be q's dtype or both fp8"):
        kern.paged_decode(q, k.half(), k, seg_pages, seg_len, req_idx, 1, 0.1, ws, 16)
    with pytest.raises(ValueError, match="2 slots exceed the workspace's 1"):
        kern.paged_decode(q.repeat(2, 1, 1, 1), k, k, seg_pages, seg_len, req_idx.repeat(2), 1, 0.1, ws, 16)
    with pytest.raises(ValueError, match="sized for 3"):
        kern.paged_decode(q, k, k, seg_pages, seg_len, req_idx, 1, 0.1,
                          kern.DecodeWorkspace.create(max_batch=1, num_heads=3, group=2, head_dim=64,
                                                      device="cpu", num_layers=2), 16)
    with pytest.raises(ValueError, match="the workspace's plan 1"):
        kern.paged_decode(q, k, k, seg_pages, seg_len, req_idx, 1, 0.1,
                          kern.DecodeWorkspace.create(max_batch=1, num_heads=2, group=2, head_dim=64,
                                                      device="cpu"), 16)
    with pytest.raises(RuntimeError, match="last plan was for None"):
        kern.paged_decode(q, k, k, seg_pages, seg_len, req_idx, 1, 0.1, ws, 16, planned=True)
    with pytest.raises(ValueError, match="must be a positive multiple"):
        kern.DecodeWorkspace.create(max_batch=2, num_heads=2, group=2, head_dim=64, device="cpu",
                                    min_split=100)


def test_device_pool_check_diff_is_nan_aware():
    import importlib.util
    import sys

    sys.path.insert(0, str(CHECK_POOL.parent))  # its _paths helper
    spec = importlib.util.spec_from_file_location("check_pool", CHECK_POOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    max_abs_diff = mod.max_abs_diff

    a = torch.zeros(4)
    assert max_abs_diff(a, a) == 0.0
    assert max_abs_diff(torch.tensor([0.0, float("nan")]), torch.zeros(2)) == float("inf")
