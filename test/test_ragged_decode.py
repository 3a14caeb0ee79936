"""The ragged split-KV decode kernel under TRITON_INTERPRET=1 against a float32 torch reference."""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch


@pytest.fixture(scope="module")
def kern():
    """The kernels module, interpreted: conftest.py sets TRITON_INTERPRET=1 before triton loads."""
    mod = importlib.import_module("sglang_fairkv.kernels.ragged_decode")
    assert mod.HAS_TRITON and mod._interpreting(), "TRITON_INTERPRET=1 must be set before import"
    return mod


def naive(q, k_pool, v_pool, indptr, indices, scale):
    """Independent fp64 reference: SDPA per segment on gathered rows."""
    S, G, D = q.shape
    out = torch.zeros(S, G, D, dtype=torch.float64)
    for s in range(S):
        a, b = int(indptr[s]), int(indptr[s + 1])
        if a == b:
            continue
        rows = indices[a:b].long()
        k = k_pool.reshape(-1, D)[rows].double()
        v = v_pool.reshape(-1, D)[rows].double()
        out[s] = torch.nn.functional.scaled_dot_product_attention(
            q[s].double()[None], k[None], v[None], scale=scale)[0]
    return out


def make_case(seed, lens, G, D, dtype, spare=37):
    g = torch.Generator().manual_seed(seed)
    lens = torch.as_tensor(lens, dtype=torch.int64)
    total = int(lens.sum())
    N = total + spare  # pool rows not referenced by any segment
    k = torch.randn(N, D, generator=g).to(dtype)
    v = torch.randn(N, D, generator=g).to(dtype)
    q = torch.randn(len(lens), G, D, generator=g).to(dtype)
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(lens, 0).to(torch.int32)
    indices = torch.randperm(N, generator=g)[:total].to(torch.int32)  # scattered rows
    return q, k, v, indptr, indices


def skewed_lengths(seed, n, mean=600):
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 1.2) * mean  # lognormal, heavy skew
    lens = x.round().clamp(0, 8192).long()
    lens[0], lens[-1] = 0, 8192  # always a zero-length and a maximal segment
    return lens


TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


@pytest.mark.parametrize("G,D,dtype", [
    (1, 64, torch.float32), (8, 128, torch.float32), (4, 64, torch.float16),
    (3, 128, torch.float16), (8, 64, torch.bfloat16), (2, 128, torch.bfloat16),
])
def test_matches_reference_on_skewed_segments(kern, G, D, dtype):
    seed = G * 1000 + D
    lens = skewed_lengths(seed, 9)
    q, k, v, indptr, indices = make_case(seed, lens, G, D, dtype)
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
    scale = 1 / math.sqrt(D)
    kern.ragged_decode(q, k, v, indptr, indices, scale, out=out)
    ref = naive(q, k, v, indptr, indices, scale)
    assert torch.isfinite(out).all()
    assert torch.equal(out[lens == 0], torch.zeros_like(out[lens == 0]))
    err = (out.double() - ref).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err}"


def test_chunk_boundaries_and_static_grid(kern):
    # lengths at and around chunk/block boundaries; a generous static grid (extra programs exit)
    lens = [256, 255, 257, 1, 0, 512, 64, 63, 65, 0]
    q, k, v, indptr, indices = make_case(7, lens, 4, 64, torch.float32)
    ref = naive(q, k, v, indptr, indices, 0.125)
    for chunk, block, extra in ((256, 64, 0), (128, 32, 50), (64, 64, 3)):
        out = torch.full_like(q, float("nan"))
        grid = sum(math.ceil(n / chunk) for n in lens) + extra
        kern.ragged_decode(q, k, v, indptr, indices, 0.125, out=out, chunk_size=chunk,
                           block_n=block, max_chunks=grid)
        assert (out.double() - ref).abs().max() < 2e-5, (chunk, block)


def test_pool_with_head_axis_and_int64_indices(kern):
    lens = [5, 0, 300]
    q, k, v, indptr, indices = make_case(3, lens, 2, 64, torch.float32)
    out = kern.ragged_decode(q, k[:, None, :], v[:, None, :], indptr.long(), indices.long(), 0.1)
    assert (out.double() - naive(q, k, v, indptr, indices, 0.1)).abs().max() < 2e-5


def test_all_segments_empty(kern):
    q, k, v, indptr, indices = make_case(1, [0, 0, 0], 2, 64, torch.float32)
    out = kern.ragged_decode(q, k, v, indptr, indices, 0.1, out=torch.full_like(q, float("nan")))
    assert torch.equal(out, torch.zeros_like(q))


def test_reference_matches_naive():
    from sglang_fairkv.kernels import ragged_decode_reference

    lens = skewed_lengths(11, 6)
    q, k, v, indptr, indices = make_case(11, lens, 3, 64, torch.float32)
    out = ragged_decode_reference(q, k, v, indptr, indices, 0.2)
    assert (out.double() - naive(q, k, v, indptr, indices, 0.2)).abs().max() < 1e-5


def test_bad_input_names_the_problem(kern):
    q, k, v, indptr, indices = make_case(1, [3, 4], 2, 64, torch.float32)
    with pytest.raises(ValueError, match=r"seg_indptr must be \[S \+ 1\] = \[3\], got \(2,\)"):
        kern.ragged_decode(q, k, v, indptr[:2], indices, 0.1)
    with pytest.raises(ValueError, match=r"k_pool must be \[N, 64\] or \[N, 1, 64\], got \(44, 32\)"):
        kern.ragged_decode(q, k[:, :32], v, indptr, indices, 0.1)
    with pytest.raises(ValueError, match="chunk_size=100 must be a positive multiple of block_n=64"):
        kern.ragged_decode(q, k, v, indptr, indices, 0.1, chunk_size=100)
    with pytest.raises(ValueError, match="dtypes differ"):
        kern.ragged_decode(q, k.half(), v, indptr, indices, 0.1)


def test_device_pool_check_dry_run_fills_segments_and_passes():
    """kernels/check_pool_device.py on the CPU (tiny sizes, interpreter): it activates and fills its
    segments (it asserts rows exist, so it cannot compare zeros with zeros) and its NaN-aware diff passes."""
    import subprocess
    import sys

    from sglang_fairkv.kernels import check_pool_device

    r = subprocess.run([sys.executable, check_pool_device.__file__, "--dry-run"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Triton decode vs torch path" in r.stdout


def test_device_pool_check_diff_is_nan_aware():
    from sglang_fairkv.kernels.check_pool_device import max_abs_diff

    a = torch.zeros(4)
    assert max_abs_diff(a, a) == 0.0
    assert max_abs_diff(torch.tensor([0.0, float("nan")]), torch.zeros(2)) == float("inf")
