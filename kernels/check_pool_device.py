"""Device check of the fairkv backend's CUDA decode paths without SGLang: a ragged pool on the GPU
(prefill extend, compaction, decode appends), then per layer the Triton kernel (and FlashInfer when it
is importable) on the pool's CSR view against the CPU path's torch function
(``attention.ragged_torch``), bf16 and fp16.

    python kernels/check_pool_device.py             # CUDA (part of kernels/bench_device.sh)
    TRITON_INTERPRET=1 python kernels/check_pool_device.py --dry-run   # CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch  # noqa: E402

from sglang_fairkv.attention.ragged_torch import ragged_decode_torch  # noqa: E402
from sglang_fairkv.kernels.ragged_decode import ragged_decode  # noqa: E402
from sglang_fairkv.kv.ragged_pool import RaggedKVPool  # noqa: E402


def max_abs_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref|, NaN-aware: a NaN or inf anywhere counts as an infinite difference (``max(x,
    nan)`` in Python would silently keep ``x``)."""
    d = (got.float() - ref.float()).abs()
    if not bool(torch.isfinite(d).all()):
        return float("inf")
    return float(d.max())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    dev = "cpu" if a.dry_run else "cuda"
    layers, heads, group, d = (2, 2, 4, 64) if a.dry_run else (8, 8, 8, 128)
    bs, max_len = (3, 300) if a.dry_run else (32, 4096)
    g = torch.Generator().manual_seed(0)
    worst = worst_fi = 0.0
    fi = None
    if not a.dry_run:
        try:
            from sglang_fairkv.attention.flashinfer_decode import FlashInferRaggedDecode

            fi = FlashInferRaggedDecode(dev)
        except ImportError as e:
            print(f"FlashInfer not importable ({e}); checking the Triton path only")
    for dtype in (torch.bfloat16, torch.float16):
        pool = RaggedKVPool(num_pages=1 + layers * heads * bs * (max_len // 16 + 4), page_size=16,
                            num_layers=layers, num_kv_heads=heads, head_dim=d, max_reqs=bs + 1,
                            max_context=max_len + 64, dtype=dtype, device=dev)
        pool.k_rows.copy_(torch.randn(pool.k_rows.shape, generator=g).to(dtype))
        pool.v_rows.copy_(torch.randn(pool.v_rows.shape, generator=g).to(dtype))
        reqs = torch.arange(1, bs + 1, device=dev)
        lens = torch.randint(64, max_len, (bs,), generator=g).to(dev)
        for r in reqs.tolist():
            pool.set_active(r)  # without it extend fills nothing and the check compares zeros
        pool.extend(reqs, lens)
        filled = int(pool.seg_len[reqs].sum())
        assert filled == layers * heads * int(lens.sum()), (filled, int(lens.sum()))
        for r in reqs.tolist():  # skewed per-head compression
            for layer in range(layers):
                n = int(pool.seg_len[r, layer, 0])
                keep = [torch.randperm(n, generator=g)[: max(1, int(n * f))].sort().values.to(dev)
                        for f in torch.rand(heads, generator=g).pow(3).tolist()]
                pool.compact(r, layer, keep)
        for _ in range(3):
            pool.append(reqs)
        for layer in range(layers):
            indptr, rows = pool.flat_segments(reqs, layer)
            q = torch.randn(bs * heads, group, d, generator=g).to(dev, dtype)
            assert int(indptr[-1]) > bs * heads, "segments hold no rows: the check would compare zeros"
            got = ragged_decode(q, pool.k_rows, pool.v_rows, indptr, rows, d ** -0.5)
            ref = ragged_decode_torch(q, pool.k_rows, pool.v_rows, indptr, rows, d ** -0.5)
            assert float(ref.float().abs().max()) > 0, "reference output is all zeros"
            worst = max(worst, max_abs_diff(got, ref))
            if fi is not None:
                fi_out = fi.run(q, pool.k_rows, pool.v_rows, indptr, rows, d ** -0.5)
                worst_fi = max(worst_fi, max_abs_diff(fi_out, ref))
        for r in reqs.tolist():
            pool.free(r)
        assert pool.used_pages() == 0
    print(f"ragged pool on {dev}: Triton decode vs torch path, max |diff| {worst:.2e} (bf16/fp16)")
    if fi is not None:
        print(f"ragged pool on {dev}: FlashInfer decode vs torch path, max |diff| {worst_fi:.2e}")
    if max(worst, worst_fi) > 3e-2:
        print("FAIL", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
