"""Device benchmark: the split-KV page-table decode kernel against FlashInfer's and SGLang's Triton decode,
and a batched prefill with a 32k-token prompt.

Decode, batch 1 / 64 / 256 x context 1k / 8k / 32k / 128k, one rank of an 8B-class model at TP 4
(2 KV heads, group 4, head_dim 128, bf16, pages of 16 rows):

* **ours**: the kept tokens of a per-head compressed cache (lognormal, sigma 1, mean half the context,
  clamped to [1, context]: the skew per-head compression produces), read through the ragged pool's
  page table with pages scattered over the pool (``paged_decode``, split-KV, its static workspace).
* **FI dense** / **SGLang triton dense**: what stock SGLang reads for the same requests, every head
  at the full context (FlashInfer's paged decode, NHD; SGLang's ``decode_attention_fwd``, token
  indices, its default 8 KV splits). Same buffer for both.
* **FI ragged**: FlashInfer over exactly our kept set, each (request, head) segment as a request of
  one KV head (the best a uniform-head kernel can do with per-head lengths).

Microseconds are medians of CUDA-event timings; correctness of ours against an fp64 reference on a
subset of segments; bytes read give GB/s. Cases that do not fit are skipped with the reason.

Prefill: the backend's per-request prefill attention (``attention/causal.py``: one request's rows
gathered from the pool, lower-right causal, flash) for a batch of two, the last 4096-token chunk of a
32k prompt and a new 64-token request, 8 KV heads x 32 query heads (an 8B model at TP 1); time, the
path taken (must be flash), peak extra memory against the bound, error against fp32.

And the CUDA prefill path itself: the same two requests in one varlen flash call (``causal.flash_varlen``,
every request's keys packed with ``cu_seqlens``), its time and its difference from the per-request path.

FlashInfer comes from ``.device/flashinfer`` (installed into a temporary site at start). Writes its
figures after every case (``$RESULT_JSON`` under ``run.py``, else ``$OUT/ragged_decode.json``).

    make device-check                                  # on the lent GPU (FlashInfer, SGLang from .device/)
    python benchmark/device/bench_kernel.py --dry-run  # on CPU, TRITON_INTERPRET=1, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
import traceback
from pathlib import Path

import torch

import _paths  # noqa: E402,F401  (the project's folders on sys.path)
import _results  # noqa: E402
from helpers.decode_reference import paged_decode_reference  # noqa: E402
from sglang_fairkv_kernels import DecodeWorkspace, paged_decode, plan_decode, target_programs_for  # noqa: E402

H, G, D, P = 2, 4, 128, 16
SGL_SPLITS = 8  # SGLang's --triton-attention-num-kv-splits default


def bench(fn, dev, iters=30, warm=5):
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


def kept_lengths(batch, ctx, seed):
    """[batch, H] kept tokens per (request, head): lognormal(sigma 1), mean ctx / 2, in [1, ctx]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(batch, H, generator=g))
    return (x / x.mean() * ctx / 2).round().clamp(1, ctx).long()


def ragged_tables(lens, dev, g):
    """seg_pages [B, 1, H, MP] with every page of the pool handed out in random order, seg_len [B, 1, H]
    int32, pages in use (page 0 reserved); also FlashInfer's CSR over the B x H segments."""
    B = lens.shape[0]
    pages_each = (lens + P - 1) // P  # [B, H]
    mp = int(pages_each.max()) + 1
    total = int(pages_each.sum())
    perm = (torch.randperm(total, generator=g) + 1).to(torch.int32)
    tables = torch.zeros(B, 1, H, mp, dtype=torch.int32)
    mask = torch.arange(mp)[None, None, :] < pages_each[..., None]
    tables[:, 0][mask] = perm
    indptr = torch.zeros(B * H + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(pages_each.reshape(-1), 0).to(torch.int32)
    return (tables.to(dev), lens.view(B, 1, H).to(dev, torch.int32), total + 1,
            (indptr.to(dev), perm.to(dev)))


def flashinfer_decode(q, k4, v4, indptr, ids, last, num_kv, fi_ws):
    import flashinfer

    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(fi_ws, "NHD", use_tensor_cores=True)
    w.plan(indptr, ids, last, num_kv * G, num_kv, D, P, q_data_type=q.dtype, kv_data_type=k4.dtype)
    return lambda: w.run(q, (k4, v4))


def sglang_decode_fn():
    """SGLang's Triton decode (``decode_attention_fwd``) from the installed SGLang, else from the carried
    bundle's site (``.device/sglang``, extracted once to /tmp/site as serve.py does)."""
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
        return decode_attention_fwd
    except ImportError:
        pass
    bundle = _paths.REPO / ".device" / "sglang"
    site = Path("/tmp/site")
    if not (site / "sglang").is_dir():
        tarfile.open(bundle / "site.tar.xz").extractall(site, filter="data")
    sys.path[:0] = [str(bundle / "standin"), str(site)]
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    return decode_attention_fwd


def decode_case(B, ctx, dev, dt, fi_ws, sgl, dry) -> dict:
    row = {"batch": B, "context": ctx}
    lens = kept_lengths(B, ctx, seed=B * 7 + ctx)
    row["kept_tokens"] = kept = int(lens.sum())
    row["dense_tokens"] = dense = B * H * ctx
    need = (kept + dense) * D * 2 * 2 + 8 * B * ctx  # K/V made directly in bf16 (no fp32 staging)
    if dev == "cuda" and need > 0.6 * torch.cuda.get_device_properties(0).total_memory:
        row["skipped"] = f"needs {need / 2**30:.0f} GiB"
        return row
    g = torch.Generator().manual_seed(1)
    gd = torch.Generator(device=dev).manual_seed(2)
    tables, seg_len, num_pages, (fi_indptr, fi_ids) = ragged_tables(lens, dev, g)
    k = torch.randn(num_pages * P, D, generator=gd, device=dev, dtype=dt)
    v = torch.randn(num_pages * P, D, generator=gd, device=dev, dtype=dt)
    q = torch.randn(B, H, G, D, generator=gd, device=dev, dtype=dt)
    req_idx = torch.arange(B, device=dev)
    ws = DecodeWorkspace.create(max_batch=B, num_heads=H, group=G, head_dim=D, device=dev,
                                target_programs=target_programs_for(dev))
    row["grid"] = [ws.programs_for(B)]
    out = torch.empty_like(q)
    plan_decode(seg_len, req_idx, ws)  # once per step in the server (every layer): not in the layer's time
    ours = lambda: paged_decode(q, k, v, tables, seg_len, req_idx, 0, D ** -0.5, ws, P, out=out, planned=True)
    ours()
    sub = min(B, 4)  # the fp64 reference loops on the host
    ref = paged_decode_reference(q[:sub], k, v, tables, seg_len, req_idx[:sub], 0, P, D ** -0.5)
    if not torch.isfinite(out).all():
        raise AssertionError("non-finite output")
    row["ours_rel_err"] = ((out[:sub].double() - ref).norm() / ref.norm()).item()
    if row["ours_rel_err"] > 2e-2:
        raise AssertionError(f"ours vs fp64: relative error {row['ours_rel_err']:.2e}")
    row["ours_us"] = bench(ours, dev)
    row["ours_GBps"] = 2 * kept * D * k.element_size() / (row["ours_us"] * 1e-6) / 1e9
    # stock layout: every head at the full context, token-major [tokens, H, D] (FI pages = P tokens)
    kd = torch.randn(B * ctx + P, H, D, generator=gd, device=dev, dtype=dt)
    vd = torch.randn_like(kd)
    qd = q.reshape(B, H * G, D)
    if not dry:  # FlashInfer is not on the CPU
        try:
            ppr = ctx // P  # pages per request, contiguous, after the reserved page 0
            indptr = torch.arange(0, B * ppr + 1, ppr, dtype=torch.int32, device=dev)
            ids = torch.arange(1, B * ppr + 1, dtype=torch.int32, device=dev)
            last = torch.full((B,), P, dtype=torch.int32, device=dev)
            fi = flashinfer_decode(qd, kd.view(-1, P, H, D), vd.view(-1, P, H, D), indptr, ids, last, H, fi_ws)
            row["fi_dense_us"] = bench(fi, dev)
            last_r = ((lens.reshape(-1) - 1) % P + 1).to(dev, torch.int32)
            fir = flashinfer_decode(q.reshape(B * H, G, D), k.view(-1, P, 1, D), v.view(-1, P, 1, D),
                                    fi_indptr, fi_ids, last_r, 1, fi_ws)
            row["fi_ragged_us"] = bench(fir, dev)
        except Exception:
            row["fi_error"] = traceback.format_exc()[-1200:]
    try:
        if sgl is None:
            raise RuntimeError("SGLang's decode_attention_fwd not importable")
        kv_indptr = torch.arange(0, B * ctx + 1, ctx, dtype=torch.int32, device=dev)
        kv_indices = torch.arange(P, B * ctx + P, dtype=torch.int64, device=dev)
        o = torch.zeros(B, H * G, D, dtype=dt, device=dev)
        logits = torch.empty(B, H * G, SGL_SPLITS, D, dtype=torch.float32, device=dev)
        lse = torch.empty(B, H * G, SGL_SPLITS, dtype=torch.float32, device=dev)
        splits = torch.full((B,), SGL_SPLITS, dtype=torch.int32, device=dev)
        fn = lambda: sgl(qd, kd, vd, o, kv_indptr, kv_indices, logits, lse, splits, SGL_SPLITS,
                         D ** -0.5, 1.0, 1.0)
        fn()
        kk = kd[P:P + ctx].float().repeat_interleave(G, 1).transpose(0, 1)  # request 0: [Hq, ctx, D]
        vv = vd[P:P + ctx].float().repeat_interleave(G, 1).transpose(0, 1)
        want = torch.softmax(qd[0].float()[:, None] @ kk.transpose(-1, -2) * D ** -0.5, -1) @ vv
        row["sgl_rel_err"] = ((o[0].float() - want[:, 0]).norm() / want.norm()).item()
        if not row["sgl_rel_err"] < 2e-2:  # it really ran over the data we time it on
            raise AssertionError(f"SGLang's decode vs fp32: relative error {row['sgl_rel_err']:.2e}")
        row["sgl_triton_dense_us"] = bench(fn, dev)
    except Exception:
        row["sgl_error"] = traceback.format_exc()[-1200:]
    for key in ("fi_dense_us", "sgl_triton_dense_us", "fi_ragged_us"):
        if key in row:
            row["ours_speedup_vs_" + key[:-3]] = row[key] / row["ours_us"]
    return row


def prefill_check(dev, dt, dry) -> dict:
    """Batched prefill (two requests) through ``causal_attention`` over rows gathered from a pool-shaped
    page table, as the backend's ``_extend`` runs it per request."""
    from sglang_fairkv.attention import causal

    hkv, hq, d = (8, 32, 128) if not dry else (2, 8, 32)
    ctx, last, new = (32768, 4096, 64) if not dry else (512, 64, 16)
    gd = torch.Generator(device=dev).manual_seed(3)
    rows_total = ctx + new
    k_rows = torch.randn(hkv * rows_total + P, d, generator=gd, device=dev, dtype=dt)
    v_rows = torch.randn_like(k_rows)
    perm = torch.randperm(hkv * rows_total // P, device=dev) * P + P  # scattered pages
    token = torch.arange(rows_total, device=dev)

    def rows_of(first, n):  # [hkv, n] rows of tokens first .. first + n - 1 of every head
        t = token[first:first + n]
        return perm[(torch.arange(hkv, device=dev)[:, None] * rows_total + t[None]) // P] + t[None] % P

    reqs = [(0, ctx, last), (ctx, new, new)]  # (first row, sequence, new tokens)
    qs = [torch.randn(1, hq, n, d, generator=gd, device=dev, dtype=dt) for _, _, n in reqs]
    used = {"flash": False}
    real = causal.flash_lower_right

    def spy(*a):
        used["flash"] = True
        return real(*a)

    causal.flash_lower_right = spy

    def run():
        outs = []
        for (first, seq, n), qq in zip(reqs, qs):
            r = rows_of(first, seq)
            outs.append(causal.causal_attention(qq, k_rows[r][None], v_rows[r][None], d ** -0.5))
        return outs

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    run()
    sync()
    base = torch.cuda.memory_allocated() if dev == "cuda" else 0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    outs = run()
    sync()
    us = (time.perf_counter() - t0) * 1e6
    peak = (torch.cuda.max_memory_allocated() - base) if dev == "cuda" else 0
    causal.flash_lower_right = real
    elt = k_rows.element_size()
    bound = int(1.25 * (2 * hkv * ctx * d * elt + 3 * 8 * hkv * ctx + 2 * (last + new) * hq * d * elt))
    r = rows_of(0, ctx)  # fp32 reference of request 0's last 64 queries
    kk = k_rows[r].float().repeat_interleave(hq // hkv, 0)
    vv = v_rows[r].float().repeat_interleave(hq // hkv, 0)
    qq = qs[0][0, :, -64:].float()
    s = qq @ kk.transpose(-1, -2) * d ** -0.5
    s = s.masked_fill(torch.arange(ctx, device=dev)[None, :] > torch.arange(ctx - 64, ctx, device=dev)[:, None],
                      float("-inf"))
    ref = torch.softmax(s, -1) @ vv
    err = ((outs[0][0, :, -64:].float() - ref).norm() / ref.norm()).item()
    res = {"heads": [hq, hkv], "context": ctx, "chunk": last, "new_request": new, "us": us,
           "flash": used["flash"], "peak_extra_MiB": peak / 2**20, "bound_MiB": bound / 2**20,
           "old_math_scores_MiB": 2 * hq * last * ctx * 4 / 2**20, "rel_err_vs_fp32": err}
    if causal.varlen_usable(dt, d, dev):  # the CUDA path: the batch in one varlen call
        q_packed = torch.cat([qq[0].transpose(0, 1) for qq in qs])  # [T, hq, d]
        rows = torch.cat([rows_of(first, seq).T for first, seq, _ in reqs])  # [K, hkv]
        cu_q = torch.tensor([0, last, last + new], dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0, ctx, ctx + new], dtype=torch.int32, device=dev)

        def one_call():
            return causal.flash_varlen(q_packed, k_rows[rows], v_rows[rows], cu_q, cu_k, last, ctx, d ** -0.5)

        o1 = one_call()
        sync()
        t0 = time.perf_counter()
        o1 = one_call()
        sync()
        res["varlen_us"] = (time.perf_counter() - t0) * 1e6
        per_req = torch.cat([o[0].transpose(0, 1) for o in outs])
        res["varlen_rel_diff"] = ((o1.float() - per_req.float()).norm() / per_req.float().norm()).item()
        if res["varlen_rel_diff"] > 1e-2:
            raise AssertionError(f"prefill: varlen vs per-request relative difference {res['varlen_rel_diff']:.2e}")
    if err > 2e-2:
        raise AssertionError(f"prefill: relative error {err:.2e} against fp32")
    if dev == "cuda" and not used["flash"]:
        raise AssertionError("prefill: the flash op was not taken on CUDA (bf16, head_dim 128)")
    if dev == "cuda" and peak > bound:
        raise AssertionError(f"prefill: {peak / 2**20:.0f} MiB extra, bound {bound / 2**20:.0f} MiB")
    return res


def install_flashinfer() -> str | None:
    """FlashInfer from ``.device/flashinfer`` (built by ``../shared/tools/flashinfer-for-device.sh``) into a
    temporary site on ``sys.path``; returns why not when it is missing."""
    import glob
    import subprocess
    import tempfile

    src = _paths.REPO / ".device" / "flashinfer"
    wheels = glob.glob(str(src / "apache_tvm_ffi-*.whl"))
    if not wheels or not (src / "flashinfer-trim.tar.xz").exists():
        return f"{src} missing: the benchmark runs our kernel alone"
    site = tempfile.mkdtemp(prefix="fi-site-")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", site, *wheels], check=True, timeout=120)
    with tarfile.open(src / "flashinfer-trim.tar.xz") as t:
        t.extractall(site, filter="data")
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = site + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ.setdefault("MAX_JOBS", "16")
    return None


def fp8_case(B, ctx, dev, dt, fi_ws, dry) -> dict:
    """``--kv-cache-dtype fp8_e4m3`` rows: our split kernel over fp8 rows (widened in registers) vs the
    same rows in ``dt``, and FlashInfer's fp8 decode over the same ragged pages. Checked against fp64 on
    the dequantised rows first (with scales), so the times are of kernels that really read the data."""
    row = {"batch": B, "context": ctx, "kv": "fp8_e4m3"}
    lens = kept_lengths(B, ctx, seed=B * 11 + ctx)
    row["kept_tokens"] = kept = int(lens.sum())
    g = torch.Generator().manual_seed(3)
    gd = torch.Generator(device=dev).manual_seed(4)
    tables, seg_len, num_pages, (fi_indptr, fi_ids) = ragged_tables(lens, dev, g)
    k = torch.randn(num_pages * P, D, generator=gd, device=dev, dtype=dt)
    v = torch.randn(num_pages * P, D, generator=gd, device=dev, dtype=dt)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    q = torch.randn(B, H, G, D, generator=gd, device=dev, dtype=dt)
    req_idx = torch.arange(B, device=dev)
    ws = DecodeWorkspace.create(max_batch=B, num_heads=H, group=G, head_dim=D, device=dev,
                                target_programs=target_programs_for(dev))
    out, out8 = torch.empty_like(q), torch.empty_like(q)
    plan_decode(seg_len, req_idx, ws)
    sub = min(B, 4)
    paged_decode(q, k8, v8, tables, seg_len, req_idx, 0, D ** -0.5, ws, P, out=out8, planned=True,
                 k_scale=0.5, v_scale=2.0)
    ref = paged_decode_reference(q[:sub], k8.double() * 0.5, v8.double() * 2.0, tables, seg_len, req_idx[:sub], 0, P,
                                 D ** -0.5)
    row["fp8_rel_err"] = ((out8[:sub].double() - ref).norm() / ref.norm()).item()
    if not row["fp8_rel_err"] < 2e-2:
        raise AssertionError(f"ours over fp8 rows vs fp64: relative error {row['fp8_rel_err']:.2e}")
    row["ours_us"] = bench(lambda: paged_decode(q, k, v, tables, seg_len, req_idx, 0, D ** -0.5, ws, P, out=out,
                                                planned=True), dev)
    row["ours_fp8_us"] = bench(lambda: paged_decode(q, k8, v8, tables, seg_len, req_idx, 0, D ** -0.5, ws, P,
                                                    out=out8, planned=True), dev)
    row["fp8_speedup"] = row["ours_us"] / row["ours_fp8_us"]
    row["ours_fp8_GBps"] = 2 * kept * D / (row["ours_fp8_us"] * 1e-6) / 1e9
    if not dry:
        try:
            last_r = ((lens.reshape(-1) - 1) % P + 1).to(dev, torch.int32)
            fi8 = flashinfer_decode(q.reshape(B * H, G, D), k8.view(-1, P, 1, D), v8.view(-1, P, 1, D),
                                    fi_indptr, fi_ids, last_r, 1, fi_ws)
            o = fi8().view(B, H, G, D)[:sub].double()
            ref1 = paged_decode_reference(q[:sub], k8.double(), v8.double(), tables, seg_len, req_idx[:sub], 0, P,
                                          D ** -0.5)
            row["fi_fp8_rel_err"] = ((o - ref1).norm() / ref1.norm()).item()
            row["fi_fp8_ragged_us"] = bench(fi8, dev)
            row["ours_fp8_speedup_vs_fi_fp8"] = row["fi_fp8_ragged_us"] / row["ours_fp8_us"]
        except Exception:
            row["fi_error"] = traceback.format_exc()[-1200:]
    return row


def _md_rows(rows: list[dict], cells: list[tuple[str, str]], lead: tuple[str, ...]) -> list[str]:
    """Markdown rows: the ``lead`` keys, then each ``(key, format)`` cell ('-' when absent); a row with an
    error or a skip says why after its lead."""
    out = []
    for r in rows:
        head = " | ".join(str(r[k]) for k in lead)
        if "error" in r or "skipped" in r:
            out.append(f"| {head} | {r.get('skipped') or r['error'].strip().splitlines()[-1]} |")
            continue
        out.append(f"| {head} | " + " | ".join(fmt.format(r[k]) if k in r else "-" for k, fmt in cells) + " |")
    return out


def table(res: dict) -> str:
    lines = ["| batch | context | kept / dense tokens | grid | ours us | FI dense us | SGLang triton dense us | "
             "FI ragged us | ours GB/s | ours rel err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["decode"]:
        r.setdefault("kept_dense", f"{r.get('kept_tokens', '-')} / {r.get('dense_tokens', '-')}")
    lines += _md_rows(res["decode"], [("kept_dense", "{}"), ("grid", "{}"), ("ours_us", "{:.1f}"),
                                      ("fi_dense_us", "{:.1f}"), ("sgl_triton_dense_us", "{:.1f}"),
                                      ("fi_ragged_us", "{:.1f}"), ("ours_GBps", "{:.0f}"),
                                      ("ours_rel_err", "{:.1e}")], ("batch", "context"))
    if res.get("fp8"):
        lines += ["", "| fp8_e4m3 rows: batch | context | kept tokens | ours bf16 us | ours fp8 us | fp8 speedup | "
                  "FI fp8 ragged us | ours fp8 GB/s | fp8 rel err |", "|---|---|---|---|---|---|---|---|---|"]
        lines += _md_rows(res["fp8"], [("kept_tokens", "{}"), ("ours_us", "{:.1f}"), ("ours_fp8_us", "{:.1f}"),
                                       ("fp8_speedup", "{:.2f}"), ("fi_fp8_ragged_us", "{:.1f}"),
                                       ("ours_fp8_GBps", "{:.0f}"), ("fp8_rel_err", "{:.1e}")], ("batch", "context"))
    if res.get("prefill"):
        lines += ["", "prefill: " + json.dumps(res["prefill"])[:1500]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (interpreter), no FlashInfer")
    args = ap.parse_args()
    dry = args.dry_run
    dev = "cpu" if dry else "cuda"
    dt = torch.float32 if dry else torch.bfloat16
    res = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0),
           "date": time.strftime("%Y-%m-%d"), "decode": [], "prefill": None, "fp8": [], "failures": []}
    if not dry:
        try:
            why = install_flashinfer()
        except Exception:  # noqa: BLE001 - report it, run our kernel alone
            why = traceback.format_exc()[-1200:]
        if why:
            res["flashinfer_missing"] = why
            res["failures"].append("flashinfer")

    def save():
        res["table"] = table(res)
        _results.write_results(res, "ragged_decode.json")

    fi_ws = None if dry else torch.zeros(512 << 20, dtype=torch.uint8, device=dev)
    sgl = None
    try:
        sgl = sglang_decode_fn()
    except Exception:
        res["sgl_import_error"] = traceback.format_exc()[-1200:]
    # the most telling cases first (a deadline cuts the tail): large batches of long contexts last
    cases = [(1, 256), (2, 512)] if dry else [(b, c) for b in (64, 1, 256) for c in (8192, 32768, 1024, 131072)]
    save()
    def case(kind: str, fn, B: int, ctx: int) -> None:
        """One row of ``res[kind]`` (its error recorded, the run goes on), saved at once."""
        try:
            row = fn(B, ctx, dev, dt, fi_ws, *((sgl,) if kind == "decode" else ()), dry)
        except Exception:
            row = {"batch": B, "context": ctx, "error": traceback.format_exc()[-2000:]}
            res["failures"].append(f"{kind} {B} x {ctx}")
        res[kind].append(row)
        print(json.dumps(row), flush=True)
        save()

    for B, ctx in cases:
        case("decode", decode_case, B, ctx)
        if dev == "cuda":
            torch.cuda.empty_cache()
        if (B, ctx) == cases[0]:  # next the fp8 rows (the fp8 kernel's only GPU run) and the prefill check: short
            for fb, fctx in ([(1, 256)] if dry else [(64, 8192), (256, 8192)]):
                case("fp8", fp8_case, fb, fctx)
            try:
                res["prefill"] = prefill_check(dev, dt, dry)
            except Exception:
                res["prefill"] = {"error": traceback.format_exc()[-2000:]}
                res["failures"].append("prefill")
            save()
    if res["prefill"] is None:
        try:
            res["prefill"] = prefill_check(dev, dt, dry)
        except Exception:
            res["prefill"] = {"error": traceback.format_exc()[-2000:]}
            res["failures"].append("prefill")
    print(json.dumps(res["prefill"]), flush=True)
    save()
    print(f"\n{res['device']}  {res['date']}")
    print(res["table"])
    if res["failures"]:
        print("FAIL: " + ", ".join(res["failures"]))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
