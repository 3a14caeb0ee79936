"""Work of the decode kernel on the CPU (Triton interpreter): does it follow the tokens or the pool?

The same batch (8 slots x 1 KV head, group 8, head_dim 128 -- a 70B rank at TP 8), decoded once with the
workspace a small pool gets and once with the one an H200-sized pool gets (1e8 rows), at 100 and 3200
tokens per segment. Interpreter seconds are a proxy for GPU work (every program and loop iteration is
executed in Python); the split-KV kernel also reports its programs and iterations itself (``work=``).

Side by side in one process: the current kernel, and the chunked kernel of an older revision loaded from
git (``--old-rev``, default the last tree before the split-KV change), whose grid and trip count were
sized from the pool.

    python benchmark/decode_work_proxy.py [--old-rev f2727ec] [--json out.json]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "kernels"), str(ROOT / "test")]

from helpers.decode_reference import paged_decode_reference  # noqa: E402
from sglang_fairkv_kernels import ragged_decode as new  # noqa: E402

B, H, G, D, P = 8, 1, 8, 128, 16
SMALL, HUGE = 64 * 1024, 10 ** 8


def old_module(rev: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:kernels/sglang_fairkv_kernels/ragged_decode.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "ragged_decode_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("ragged_decode_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def tables(n_tokens: int):
    """One layer, B requests x H heads of ``n_tokens`` each, pages scattered."""
    pages_each = -(-n_tokens // P)
    total = B * H * pages_each
    perm = (torch.randperm(total, generator=torch.Generator().manual_seed(0)) + 1).to(torch.int32)
    seg_pages = torch.zeros(B, 1, H, pages_each + 1, dtype=torch.int32)
    seg_pages[:, 0, :, :pages_each] = perm.view(B, H, pages_each)
    seg_len = torch.full((B, 1, H), n_tokens, dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    k = torch.randn((total + 1) * P, D, generator=g)
    v = torch.randn((total + 1) * P, D, generator=g)
    q = torch.randn(B, H, G, D, generator=g)
    return q, k, v, seg_pages, seg_len, torch.arange(B)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_new(pool_rows: int, n: int) -> dict:
    from sglang_fairkv.kv.sizing import rank_pool_sizes

    sz = rank_pool_sizes(max_total_tokens=pool_rows // (4 * H), rows_per_token_budget=4 * H, row_bytes=2 * D * 2,
                         heads=H, page_size=P, num_layers=4, max_reqs=64, max_context=8192, group=G,
                         head_dim=D, on_cuda=True)  # the workspace a CUDA server of that pool builds
    ws = new.DecodeWorkspace.create(**sz.workspace_kw, device="cpu")
    q, k, v, sp, sl, ri = tables(n)
    work = torch.zeros(ws.programs_for(B), dtype=torch.int32)
    out = torch.empty_like(q)
    s = timed(lambda: new.paged_decode(q, k, v, sp, sl, ri, 0, D ** -0.5, ws, P, out=out, work=work))
    ref = paged_decode_reference(q, k, v, sp, sl, ri, 0, P, D ** -0.5)
    assert (out.double() - ref).abs().max() < 1e-4
    return {"kernel": "length-split", "pool_rows": pool_rows, "tokens": n, "seconds": s,
            "programs": work.numel(), "iterations": int(work.sum())}


def run_old(mod, pool_rows: int, n: int) -> dict:
    ws = mod.DecodeWorkspace.create(max_segments=64 * H, pool_rows=pool_rows, group=G, head_dim=D, device="cpu")
    q, k, v, sp, sl, ri = tables(n)
    ct = mod.chunk_tables(sl[ri], ws.chunk_size)[0]
    out = torch.empty_like(q)
    s = timed(lambda: mod.paged_decode(q, k, v, sp, sl, ri, 0, ct, D ** -0.5, ws, P, out=out))
    ref = paged_decode_reference(q, k, v, sp, sl, ri, 0, P, D ** -0.5)
    assert (out.double() - ref).abs().max() < 1e-4
    return {"kernel": "chunked (old)", "pool_rows": pool_rows, "tokens": n, "seconds": s,
            "programs": ws.max_chunks, "chunk": ws.chunk_size,
            "iterations": int(ct[-1]) * (ws.chunk_size // ws.block_n)}  # each working program: CHUNK / BLOCK_N


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-rev", default="f2727ec")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    old = old_module(a.old_rev) if a.old_rev else None
    for n in (100, 3200):
        for pool_rows in (SMALL, HUGE):
            rows.append(run_new(pool_rows, n))
            print(json.dumps(rows[-1]), flush=True)
            if old is not None:
                rows.append(run_old(old, pool_rows, n))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| kernel | pool rows | tokens / segment | interpreter s | programs | loop iterations |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['pool_rows']:.0e} | {r['tokens']} | {r['seconds']:.2f} | {r['programs']} | "
              f"{r['iterations']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
