"""The page-table decode kernel under TRITON_INTERPRET=1 against an fp64 reference reading the same tables."""

from __future__ import annotations

import importlib
import math
import os
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


def run(kern, q, seg_pages, seg_len, req_idx, layer, P, num_pages, ws, scale):
    D = q.shape[-1]
    g = torch.Generator().manual_seed(5)
    k = torch.randn(num_pages * P, D, generator=g).to(q.dtype)
    v = torch.randn(num_pages * P, D, generator=g).to(q.dtype)
    lens = seg_len[req_idx]  # [B, L, H]
    ct = kern.chunk_tables(lens, ws.chunk_size)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)  # poisoned: every entry must be written
    kern.paged_decode(q, k, v, seg_pages, seg_len, req_idx, layer, ct[layer], scale, ws, P, out=out)
    return out, naive(q, k, v, seg_pages, seg_len, req_idx, layer, P, scale)


@pytest.mark.parametrize("G,D,dtype", [
    (1, 64, torch.float32), (8, 128, torch.float32), (4, 64, torch.float16),
    (3, 128, torch.float16), (8, 64, torch.bfloat16), (2, 128, torch.bfloat16),
])
def test_matches_reference_on_skewed_segments(kern, G, D, dtype):
    seed = G * 1000 + D
    lens = skewed(seed, 8).view(4, 2)
    seg_pages, seg_len, req_idx, num_pages = make_tables(seed, lens)
    ws = kern.DecodeWorkspace.create(max_segments=16, pool_rows=num_pages * 16, group=G, head_dim=D,
                                     device="cpu")
    q = torch.randn(4, 2, G, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out, ref = run(kern, q, seg_pages, seg_len, req_idx, 1, 16, num_pages, ws, 1 / math.sqrt(D))
    assert torch.isfinite(out).all()
    zero = lens == 0
    assert torch.equal(out[zero], torch.zeros_like(out[zero]))
    err = (out.double() - ref).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err}"


def test_batch_sizes_share_one_static_workspace(kern):
    """Several batch sizes, fewer local heads than the table has (a FairKV layer), page sizes and chunk
    boundaries, all through one workspace: the scratch is never reallocated and the grid is fixed."""
    ws = kern.DecodeWorkspace.create(max_segments=8 * 3, pool_rows=4096, group=4, head_dim=64,
                                     device="cpu", chunk_size=128, block_n=32)
    ptrs = (ws.o_part.data_ptr(), ws.lse_part.data_ptr(), ws.max_chunks)
    for B, Hl, P, lens in ((1, 1, 16, [[700]]), (3, 2, 8, [[128, 127], [129, 0], [1, 256]]),
                           (8, 3, 16, None)):
        if lens is None:
            lens = torch.randint(0, 300, (B, Hl), generator=torch.Generator().manual_seed(B))
        seg_pages, seg_len, req_idx, num_pages = make_tables(B, lens, P=P, H=3, L=3, layer=2)
        q = torch.randn(B, Hl, 4, 64, generator=torch.Generator().manual_seed(B))
        out, ref = run(kern, q, seg_pages, seg_len, req_idx, 2, P, num_pages, ws, 0.125)
        assert (out.double() - ref).abs().max() < 2e-5, (B, Hl, P)
    assert (ws.o_part.data_ptr(), ws.lse_part.data_ptr(), ws.max_chunks) == ptrs


def test_q_strided_in_batch_and_heads(kern):
    """q as the backend passes it: a view of ``[b, Hq * D]`` reshaped, and a non-contiguous slice."""
    seg_pages, seg_len, req_idx, num_pages = make_tables(3, [[5, 0], [300, 17]])
    ws = kern.DecodeWorkspace.create(max_segments=4, pool_rows=num_pages * 16, group=2, head_dim=64, device="cpu")
    big = torch.randn(2, 3, 2, 64, generator=torch.Generator().manual_seed(1))
    q = big[:, :2]  # strided in the head axis
    out, ref = run(kern, q, seg_pages, seg_len, req_idx, 1, 16, num_pages, ws, 0.1)
    assert (out.double() - ref).abs().max() < 2e-5


def test_all_segments_empty(kern):
    seg_pages, seg_len, req_idx, num_pages = make_tables(1, [[0, 0], [0, 0]])
    ws = kern.DecodeWorkspace.create(max_segments=4, pool_rows=num_pages * 16, group=2, head_dim=64, device="cpu")
    q = torch.randn(2, 2, 2, 64)
    out, _ = run(kern, q, seg_pages, seg_len, req_idx, 1, 16, num_pages, ws, 0.1)
    assert torch.equal(out, torch.zeros_like(q))


def test_workspace_bounds():
    from sglang_fairkv_kernels import DecodeWorkspace

    ws = DecodeWorkspace.create(max_segments=100, pool_rows=1 << 30, group=8, head_dim=128, device="cpu",
                                max_scratch_chunks=1000)
    assert ws.chunk_size % ws.block_n == 0 and (1 << 30) // ws.chunk_size <= 1000
    assert ws.max_chunks == (1 << 30) // ws.chunk_size + 100
    assert ws.search_steps == math.ceil(math.log2(101))
    assert ws.nbytes == DecodeWorkspace.bytes_for(max_segments=100, pool_rows=1 << 30, group=8,
                                                  head_dim=128, max_scratch_chunks=1000)


def test_chunk_tables_match_python():
    from sglang_fairkv_kernels import chunk_tables

    lens = torch.randint(0, 2000, (3, 4, 2), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    ct = chunk_tables(lens, 512)
    for l in range(4):
        counts = [math.ceil(int(lens[b, l, h]) / 512) for b in range(3) for h in range(2)]
        assert ct[l].tolist() == [0, *torch.cumsum(torch.tensor(counts), 0).tolist()]


def test_bad_input_names_the_problem(kern):
    seg_pages, seg_len, req_idx, num_pages = make_tables(1, [[3, 4]])
    ws = kern.DecodeWorkspace.create(max_segments=2, pool_rows=num_pages * 16, group=2, head_dim=64, device="cpu")
    q = torch.randn(1, 2, 2, 64)
    k = torch.randn(num_pages * 16, 64)
    ct = kern.chunk_tables(seg_len[req_idx], ws.chunk_size)[1]
    with pytest.raises(ValueError, match=r"chunk_indptr must be \[B \* H \+ 1\] = \[3\], got \(2,\)"):
        kern.paged_decode(q, k, k, seg_pages, seg_len, req_idx, 1, ct[:2], 0.1, ws, 16)
    with pytest.raises(ValueError, match=r"k_rows must be \[N, 64\]"):
        kern.paged_decode(q, k[:, :32], k, seg_pages, seg_len, req_idx, 1, ct, 0.1, ws, 16)
    with pytest.raises(ValueError, match="dtypes differ"):
        kern.paged_decode(q, k.half(), k, seg_pages, seg_len, req_idx, 1, ct, 0.1, ws, 16)
    with pytest.raises(ValueError, match="exceed the workspace's 2 segments"):
        kern.paged_decode(q.repeat(2, 1, 1, 1), k, k, seg_pages, seg_len, req_idx.repeat(2), 1,
                          torch.zeros(5, dtype=torch.int32), 0.1, ws, 16)
    with pytest.raises(ValueError, match="must be a positive multiple"):
        kern.DecodeWorkspace.create(max_segments=2, pool_rows=10, group=2, head_dim=64, device="cpu",
                                    chunk_size=100)


def test_device_pool_check_dry_run_fills_segments_and_passes():
    """benchmark/device/check_pool.py on the CPU (tiny sizes, interpreter): it activates and fills its
    segments (it asserts rows exist, so it cannot compare zeros with zeros) and its NaN-aware diff passes."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(CHECK_POOL), "--dry-run"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "paged Triton decode vs torch path" in r.stdout


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
