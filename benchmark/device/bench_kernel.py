"""Device benchmark: ragged per-head decode — FlashInfer uniform vs FlashInfer ragged vs our page-table kernel.

Same GPU, same total KV tokens per case: lognormal(sigma=1) segment lengths (the skew per-head
compression produces), group 8 (GQA), head_dim 128, bf16, 512..8192 segments (one KV head per
request, as a 70B rank at TP 8), mean 512..2048 tokens, pages of 16 rows scattered over the pool.
Our kernel (``paged_decode``) reads the page table in place with its static workspace; FlashInfer
gets the same pages as a CSR page list (its ``plan()`` is timed apart, as host cost).
Reports microseconds (median of CUDA-event timings), throughput relative to FlashInfer on a uniform
layout of the same total, achieved bandwidth vs a device-to-device copy measured in the same run,
and the relative error of our kernel against a float32 reference. Writes $OUT/ragged_decode.json
and prints a markdown table last.

    make device-check                                  # on the lent GPU (installs FlashInfer from .device/)
    python benchmark/device/bench_kernel.py --dry-run  # on CPU, TRITON_INTERPRET=1, tiny sizes, no FlashInfer
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch

import _paths  # noqa: E402,F401  (the project's folders on sys.path)
from helpers.decode_reference import paged_decode_reference  # noqa: E402
from sglang_fairkv_kernels import DecodeWorkspace, chunk_tables, paged_decode  # noqa: E402

G, D = 8, 128


def bench(fn, dev, iters=50, warm=10):
    if dev == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1000.0)
    ts.sort()
    return ts[len(ts) // 2]


def lognormal_lengths(n, mean, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * sigma)
    x = x / x.mean() * mean
    return x.round().clamp(min=1).long()


def copy_bandwidth(dev):
    n = 1 << 30 if dev == "cuda" else 1 << 20
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    a.random_(0, 255)
    us = bench(lambda: b.copy_(a), dev)
    return 2 * n / (us * 1e-6) / 1e9  # GB/s, read + write


P = 16


def flashinfer_runner(q, k, v, lens, pages_csr, ws):
    """FlashInfer paged decode over the same pages: ``lens`` [n] tokens, ``pages_csr`` (indptr, ids)."""
    import flashinfer

    indptr, ids = pages_csr
    last = ((lens - 1) % P + 1).to(torch.int32).clamp_min(1).to(q.device)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    w.plan(indptr, ids, last, G, 1, D, P, q_data_type=q.dtype, kv_data_type=k.dtype)
    k4, v4 = k.view(-1, P, 1, D), v.view(-1, P, 1, D)
    return lambda: w.run(q.view(-1, G, D), (k4, v4))


def paged_case(lens, dev, g):
    """Page tables [n, 1, 1, MP] (one request per segment, one layer, one head) with every page of
    the pool handed out in random order; also the CSR page list FlashInfer takes."""
    n = lens.numel()
    pages_each = (lens + P - 1) // P
    mp = int(pages_each.max()) + 1
    total_pages = int(pages_each.sum())
    perm = torch.randperm(total_pages, generator=g) + 1  # page 0 reserved
    tables = torch.zeros(n, 1, 1, mp, dtype=torch.int32)
    mask = torch.arange(mp)[None, :] < pages_each[:, None]
    tables[:, 0, 0][mask] = perm.to(torch.int32)
    indptr = torch.zeros(n + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(pages_each, 0).to(torch.int32)
    return tables.to(dev), lens.view(n, 1, 1).to(dev, torch.int32), total_pages + 1, (indptr.to(dev), perm.to(dev, torch.int32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, no FlashInfer")
    args = ap.parse_args()
    dev = "cpu" if args.dry_run else "cuda"
    dt = torch.float32 if args.dry_run else torch.bfloat16
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    res = {"device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0),
           "date": time.strftime("%Y-%m-%d"), "rows": []}
    res["copy_GBps"] = copy_bandwidth(dev)
    cases = [(16, 64), (8, 256)] if args.dry_run else \
        [(512, 512), (512, 2048), (2048, 512), (2048, 2048), (8192, 512), (8192, 1024)]
    chunks = (64,) if args.dry_run else (256, 512, 1024)
    ws = None if args.dry_run else torch.zeros(512 << 20, dtype=torch.uint8, device=dev)
    for segs, mean in cases:
        row = {"segments": segs, "mean_len": mean}
        try:
            lens = lognormal_lengths(segs, mean, 1.0, seed=segs + mean)
            total = int(lens.sum())
            row["tokens"] = total
            g = torch.Generator(device="cpu").manual_seed(1)
            tables, seg_len, num_pages, csr = paged_case(lens, dev, g)
            gd = torch.Generator(device=dev).manual_seed(2)  # data made on the device
            k = torch.randn(num_pages * P, D, generator=gd, device=dev).to(dt)
            v = torch.randn(num_pages * P, D, generator=gd, device=dev).to(dt)
            q = torch.randn(segs, 1, G, D, generator=gd, device=dev).to(dt)
            req_idx = torch.arange(segs, device=dev)
            bytes_moved = 2 * total * D * k.element_size()  # K and V read once
            sub = min(segs, 32)  # the fp64 reference loops on the host
            ref = paged_decode_reference(q[:sub], k, v, tables, seg_len, req_idx[:sub], 0, P, D ** -0.5)
            out = torch.empty_like(q)
            for c in chunks:
                ws_ = DecodeWorkspace.create(max_segments=segs, pool_rows=num_pages * P, group=G, head_dim=D,
                                             device=dev, chunk_size=c, block_n=min(64, c))
                ct = chunk_tables(seg_len, ws_.chunk_size)[0]
                fn = lambda: paged_decode(q, k, v, tables, seg_len, req_idx, 0, ct, D ** -0.5, ws_, P, out=out)
                fn()
                if c == chunks[0]:
                    o = out[:sub].double()
                    row["ours_rel_err"] = ((o - ref).norm() / ref.norm()).item()
                    if not torch.isfinite(out).all():
                        raise AssertionError("non-finite output")
                row[f"ours_c{c}_us"] = bench(fn, dev)
            best = min(row[f"ours_c{c}_us"] for c in chunks)
            row["ours_best_us"] = best
            row["ours_GBps"] = bytes_moved / (best * 1e-6) / 1e9
            row["ours_vs_copy"] = row["ours_GBps"] / res["copy_GBps"]
            if not args.dry_run:
                try:  # FlashInfer is optional: our numbers stand without it
                    uni_len = torch.full_like(lens, total // segs)
                    _, _, _, uni_csr = paged_case(uni_len, dev, g)
                    fi_uni = flashinfer_runner(q, k, v, uni_len, uni_csr, ws)
                    fi_rag = flashinfer_runner(q, k, v, lens, csr, ws)
                    row["fi_uniform_us"] = bench(fi_uni, dev)
                    row["fi_ragged_us"] = bench(fi_rag, dev)
                    fo = fi_rag().double().view(segs, 1, G, D)[:sub]
                    row["fi_rel_err"] = ((fo - ref).norm() / ref.norm()).item()
                    t0 = time.perf_counter()
                    flashinfer_runner(q, k, v, lens, csr, ws)  # host cost of plan()
                    torch.cuda.synchronize()
                    row["fi_plan_host_us"] = (time.perf_counter() - t0) * 1e6
                    row["ours_vs_fi_uniform"] = row["fi_uniform_us"] / best
                    row["fi_ragged_vs_fi_uniform"] = row["fi_uniform_us"] / row["fi_ragged_us"]
                except Exception:
                    row["fi_error"] = traceback.format_exc()[-1500:]
        except Exception:
            row["error"] = traceback.format_exc()[-2000:]
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        json.dump(res, open(os.path.join(out_dir, "ragged_decode.json"), "w"), indent=1)
    print(f"\n{res['device']}  {res['date']}  copy {res['copy_GBps']:.0f} GB/s (read+write)")
    print("| segments | mean | FI uniform us | FI ragged us | ours us | ours/FI-uniform thrpt | FI-ragged/FI-uniform | ours GB/s | vs copy | ours rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        if "error" in r:
            print(f"| {r['segments']} | {r['mean_len']} | error: {r['error'].splitlines()[-1]} |")
            continue
        f = lambda key, fmt="{:.1f}": fmt.format(r[key]) if key in r else "-"
        print(f"| {r['segments']} | {r['mean_len']} | {f('fi_uniform_us')} | {f('fi_ragged_us')} | "
              f"{f('ours_best_us')} | {f('ours_vs_fi_uniform', '{:.3f}')} | "
              f"{f('fi_ragged_vs_fi_uniform', '{:.3f}')} | {f('ours_GBps', '{:.0f}')} | "
              f"{f('ours_vs_copy', '{:.3f}')} | {f('ours_rel_err', '{:.1e}')} |")


if __name__ == "__main__":
    main()
