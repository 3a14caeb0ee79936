"""Device check of the fairkv decode path without SGLang: a ragged pool on the GPU filled through the
pool's own API (prefill extend with K/V generated on the GPU, skewed per-head compaction, decode appends),
then per layer the page-table Triton kernel (``paged_decode``) against the torch path the CPU server
runs (``paged_decode_torch``), bf16 and fp16, NaN-aware; and the time of a whole decode step (host
bookkeeping + one upload + every layer's K/V write and attention), per layer, for a SmolLM2-shaped and a
70B-per-rank-shaped (TP 8) model; and a live re-plan's pool work (pack, unpack, table re-lay) for a
70B-per-rank-shaped pool, without the wire.

Every part runs and reports even when an earlier one fails; exit status 1 if any failed. Writes its
figures after every part (``$RESULT_JSON`` under ``run.py``, else ``$OUT/pool_check.json``).

    python benchmark/device/check_pool.py             # CUDA (make device-check)
    TRITON_INTERPRET=1 python benchmark/device/check_pool.py --dry-run   # CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _paths  # noqa: E402,F401  (the project's folders on sys.path)
import _results  # noqa: E402
from sglang_fairkv.kv.ragged_pool import RaggedKVPool  # noqa: E402
from sglang_fairkv_kernels import DecodeWorkspace, paged_decode, paged_decode_torch, plan_decode, target_programs_for  # noqa: E402


def max_abs_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref|, NaN-aware: a NaN or inf anywhere counts as an infinite difference (``max(x,
    nan)`` in Python would silently keep ``x``)."""
    d = (got.float() - ref.float()).abs()
    if not bool(torch.isfinite(d).all()):
        return float("inf")
    return float(d.max())


def filled_pool(*, layers, heads, d, bs, max_len, dtype, dev, seed, keep_pow=3.0):
    """A pool holding ``bs`` requests: prompts of random length < ``max_len`` written by ``extend``
    with K/V generated on the device, then every (layer, head) compacted to a random share (skewed:
    ``u ** keep_pow``), then 3 decode appends. Returns (pool, req_idx host, req_idx device)."""
    P = 16
    pool = RaggedKVPool(num_pages=1 + layers * heads * bs * (max_len // P + 4), page_size=P,
                        num_layers=layers, num_kv_heads=heads, head_dim=d, max_reqs=bs + 1,
                        max_context=max_len + 64, dtype=dtype, device=dev)
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=dev).manual_seed(seed)
    reqs = np.arange(1, bs + 1)
    lens = torch.randint(64, max_len, (bs,), generator=g).numpy()
    for r in reqs:
        pool.set_active(int(r))  # without it extend fills nothing and the check compares zeros
    pool.extend(reqs, lens)
    pool.flush()
    idx = torch.as_tensor(reqs, device=dev)
    T = int(lens.max())
    for layer in range(layers):
        rows = pool.rows_at(idx, layer, heads, torch.arange(T, device=dev))  # [bs, H, T]
        valid = torch.arange(T, device=dev) < torch.as_tensor(lens, device=dev)[:, None, None]
        rows = torch.where(valid, rows, 0)
        pool.k_rows[rows] = torch.randn(*rows.shape, d, generator=gd, device=dev).to(dtype)
        pool.v_rows[rows] = torch.randn(*rows.shape, d, generator=gd, device=dev).to(dtype)
    filled = pool.used_tokens()
    assert filled == layers * heads * int(lens.sum()), (filled, int(lens.sum()))
    for r, n in zip(reqs.tolist(), lens.tolist()):
        for layer in range(layers):
            keep = [torch.randperm(n, generator=g)[: max(1, int(n * f))].sort().values.to(dev)
                    for f in torch.rand(heads, generator=g).pow(keep_pow).tolist()]
            pool.compact(r, layer, keep)
    for _ in range(3):
        pool.append(reqs, idx)
    return pool, reqs, idx


def check_correctness(dev: str, dry: bool) -> dict:
    layers, heads, group, d = (2, 2, 4, 64) if dry else (8, 8, 8, 128)
    bs, max_len = (3, 300) if dry else (32, 4096)
    res = {}
    for dtype in (torch.bfloat16, torch.float16):
        pool, reqs, idx = filled_pool(layers=layers, heads=heads, d=d, bs=bs, max_len=max_len, dtype=dtype,
                                      dev=dev, seed=0)
        ws = DecodeWorkspace.create(max_batch=bs, num_heads=heads, group=group, head_dim=d, device=dev,
                                    target_programs=target_programs_for(dev), num_layers=layers)
        pool.append(reqs, idx)
        plan_decode(pool.seg_len, idx, ws)  # the step's plan, as the server makes it
        worst, rows_read = 0.0, 0
        gd = torch.Generator(device=dev).manual_seed(1)
        for layer in range(layers):
            n_layer = int(pool.seg_len_host[reqs, layer].sum())
            assert n_layer > bs * heads * 4, "segments hold no rows: the check would compare zeros"
            rows_read += n_layer
            q = torch.randn(bs, heads, group, d, generator=gd, device=dev).to(dtype)
            got = paged_decode(q, pool.k_rows, pool.v_rows, pool.seg_pages, pool.seg_len, idx, layer,
                               d ** -0.5, ws, pool.page_size, planned=True)
            t = int(pool.seg_len_host[reqs, layer].max())
            ref = paged_decode_torch(q, pool.k_rows, pool.v_rows, pool.seg_pages, pool.seg_len, idx, layer,
                                     d ** -0.5, pool.page_size, max_len=t)
            assert float(ref.float().abs().max()) > 0, "reference output is all zeros"
            worst = max(worst, max_abs_diff(got, ref))
        for r in reqs.tolist():
            pool.free(r)
        assert pool.used_pages() == 0
        res[str(dtype).replace("torch.", "")] = {"max_abs_diff": worst, "rows_read": rows_read}
        if worst > 3e-2:
            raise AssertionError(f"{dtype}: paged Triton decode vs torch path max |diff| {worst:.2e}")
    print(f"ragged pool on {dev}: paged Triton decode vs torch path, max |diff| "
          f"{max(v['max_abs_diff'] for v in res.values()):.2e} (bf16/fp16), rows read {res}")
    return res


def time_step(dev: str, dry: bool, name: str, *, layers, heads, group, d, bs, max_len) -> dict:
    """Wall time of whole decode steps (host bookkeeping, the step's upload, then per
    layer K/V write + attention) divided by the layers, beside the per-step host part alone."""
    dtype = torch.bfloat16 if not dry else torch.float32
    pool, reqs, idx = filled_pool(layers=layers, heads=heads, d=d, bs=bs, max_len=max_len, dtype=dtype,
                                  dev=dev, seed=2, keep_pow=1.0)
    ws = DecodeWorkspace.create(max_batch=bs, num_heads=heads, group=group, head_dim=d, device=dev,
                                target_programs=target_programs_for(dev), num_layers=layers)
    q = torch.randn(bs, heads, group, d, device=dev).to(dtype)
    kv = torch.randn(bs, heads, d, device=dev).to(dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step():
        rows, _ = pool.append(reqs, idx)
        plan_decode(pool.seg_len, idx, ws)
        for layer in range(layers):
            pool.k_rows[rows[layer]] = kv
            pool.v_rows[rows[layer]] = kv
            paged_decode(q, pool.k_rows, pool.v_rows, pool.seg_pages, pool.seg_len, idx, layer,
                         d ** -0.5, ws, pool.page_size, planned=True)

    steps = 1 if dry else 20
    step()  # compile / warm
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    total = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        pool.append(reqs, idx)
    host = (time.perf_counter() - t0) / steps  # host part + its (asynchronous) device launches
    sync()
    kept = int(pool.seg_len_host[reqs].sum())
    out = {"shape": name, "layers": layers, "kv_heads": heads, "group": group, "head_dim": d, "batch": bs,
           "kept_rows_per_layer": kept // layers, "step_ms": total * 1e3, "per_layer_us": total / layers * 1e6,
           "append_host_us": host * 1e6}
    print(f"decode step {name}: {out['step_ms']:.2f} ms/step, {out['per_layer_us']:.1f} us/layer "
          f"(append host part {out['append_host_us']:.0f} us/step), batch {bs}, {out['kept_rows_per_layer']} "
          "kept rows per layer")
    return out


def time_migrate(dev: str, dry: bool, *, layers: int, d: int, bs: int, max_len: int) -> dict:
    """A live re-plan's pool work on one device, without the wire (issue 34): rank 0 holds one KV head per
    layer (a filled pool, skewed kept lengths) and every segment of it moves to rank 1 (an empty pool): rank 0
    packs (one gather per destination, its tables re-laid), a loopback exchange hands the bytes over, rank 1
    unpacks (pages popped, one scatter) and re-lays. Checks every row arrived bit for bit; times each side
    (host + device, synchronised). What NVLink / InfiniBand add is the bytes over the link's bandwidth."""
    from sglang_fairkv.kv.segment_mover import move_segments
    from sglang_fairkv.placement.transition import Move

    src, reqs, _ = filled_pool(layers=layers, heads=1, d=d, bs=bs, max_len=max_len, dtype=torch.bfloat16, dev=dev,
                               seed=11)
    dst = RaggedKVPool(num_pages=src.num_pages, page_size=src.page_size, num_layers=layers, num_kv_heads=1,
                       head_dim=d, max_reqs=src.max_reqs, max_context=src.max_context, dtype=torch.bfloat16,
                       device=dev)
    P = src.page_size
    moves, want = [], []
    for i, r in enumerate(reqs.tolist()):
        for l in range(layers):
            n = int(src.seg_len_host[r, l, 0])
            t = np.arange(n)
            rows = torch.as_tensor(src.seg_pages_host[r, l, 0, t // P].astype(np.int64) * P + t % P, device=dev)
            want.append((r, l, src.k_rows[rows].clone(), src.v_rows[rows].clone()))
            moves.append(Move(i, l, 0, 0, 1, n, -(-n // P)))
    owner_b = np.ones((len(reqs), layers, 1), dtype=np.int64)
    mailbox: dict = {}
    kw = dict(moves=moves, rounds=[list(range(len(moves)))], req_idx=reqs, owner_b=owner_b)

    def timed(fn):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        return out, (time.perf_counter() - t0) * 1e3

    sent, pack_ms = timed(lambda: move_segments(src, rank=0, heads_a=[[0]] * layers, heads_b=[[]] * layers,
                                                exchange=lambda s, r: mailbox.update(s) or {}, **kw))
    got, unpack_ms = timed(lambda: move_segments(dst, rank=1, heads_a=[[]] * layers, heads_b=[[0]] * layers,
                                                 exchange=lambda s, r: {0: mailbox[1]}, **kw))
    for r, l, k, v in want:
        n = int(dst.seg_len_host[r, l, 0])
        t = np.arange(n)
        rows = torch.as_tensor(dst.seg_pages_host[r, l, 0, t // P].astype(np.int64) * P + t % P, device=dev)
        assert n == k.shape[0] and torch.equal(dst.k_rows[rows], k) and torch.equal(dst.v_rows[rows], v), (r, l)
    assert src.used_pages() == 0 and dst.used_pages() == sum(m.pages for m in moves)
    mb = sent["bytes_sent"] / 1e6
    out = {"layers": layers, "batch": bs, "segments": len(moves), "mb_moved": round(mb, 2),
           "pack_ms": round(pack_ms, 3), "unpack_ms": round(unpack_ms, 3),
           "pack_gb_s": round(mb / max(pack_ms, 1e-6), 2), "unpack_gb_s": round(mb / max(unpack_ms, 1e-6), 2)}
    print(f"migrate pool work: {len(moves)} segments, {mb:.1f} MB: pack {pack_ms:.2f} ms, unpack {unpack_ms:.2f} ms")
    return out


def table(report: dict) -> str:
    """Markdown of the figures so far."""
    rows = ["| part | figure |", "|---|---|"]
    c = report.get("correctness")
    if isinstance(c, dict) and "error" not in c:
        rows += [f"| Triton vs torch decode, {dt} | max abs diff {v['max_abs_diff']:.2e} over {v['rows_read']} rows |"
                 for dt, v in c.items()]
    for k, v in report.items():
        if k.startswith("step_") and isinstance(v, dict) and "step_ms" in v:
            rows.append(f"| decode step {v['shape']} (batch {v['batch']}, {v['layers']} layers) | "
                        f"{v['step_ms']:.2f} ms, {v['per_layer_us']:.1f} us/layer, host {v['append_host_us']:.0f} us |")
    m = report.get("migrate")
    if isinstance(m, dict) and "pack_ms" in m:
        rows.append(f"| live re-plan pool work, {m['segments']} segments, {m['mb_moved']} MB (no wire) | pack "
                    f"{m['pack_ms']:.2f} ms, unpack {m['unpack_ms']:.2f} ms |")
    rows += [f"| {k} | ERROR |" for k, v in report.items() if isinstance(v, dict) and "error" in v]
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    dev = "cpu" if a.dry_run else "cuda"
    report, failed = {"device": dev if a.dry_run else torch.cuda.get_device_name(0)}, []
    parts = [("correctness", lambda: check_correctness(dev, a.dry_run))]
    shapes = {"smollm2": dict(layers=30, heads=3, group=3, d=64),
              "llama70b_tp8_rank": dict(layers=80, heads=1, group=8, d=128)}
    for name, shp in shapes.items():
        sizes = dict(bs=2, max_len=100) if a.dry_run else dict(bs=64, max_len=4096)
        if a.dry_run:
            shp = {**shp, "layers": 2}
        parts.append((f"step_{name}", lambda n=name, s=shp, z=sizes: time_step(dev, a.dry_run, n, **s, **z)))
    mig = dict(layers=2, d=64, bs=2, max_len=100) if a.dry_run else dict(layers=80, d=128, bs=16, max_len=4096)
    parts.append(("migrate", lambda: time_migrate(dev, a.dry_run, **mig)))
    for name, fn in parts:
        try:
            report[name] = fn()
        except Exception:  # report and go on: every part reports
            failed.append(name)
            report[name] = {"error": traceback.format_exc()[-3000:]}
            print(f"FAIL {name}:\n{report[name]['error']}", file=sys.stderr)
        report["failures"], report["table"] = failed, table(report)
        _results.write_results(report, "pool_check.json")  # what is done so far, at once
    print("FAILED: " + ", ".join(failed) if failed else "all parts passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
