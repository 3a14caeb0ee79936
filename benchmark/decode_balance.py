"""Decode work balance under per-head skew, on the CPU (Triton interpreter): the longest program vs the
even share of a step, counted by the kernels themselves (``work=``), side by side in one process.

Batches of B slots x H KV heads with lognormal per-head lengths (AdaKV's shape: a median and a heavy
tail), group 4, head_dim 64, one layer. Kernels: the current one (a per-step plan splits the work into
pieces of at most the layer's even share over every (slot, head) segment) and the split-KV kernel of an
older revision loaded from git (``--old-rev``, default the last tree with a split count fixed per batch
size), whose longest segment ran in one program's loop. Both are checked against an fp64 reference.

    python benchmark/decode_balance.py [--old-rev c8eb5f7] [--json out.json]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "kernels"), str(ROOT / "test"), str(ROOT / "benchmark")]

from decode_work_proxy import old_module  # noqa: E402
from helpers.decode_reference import paged_decode_reference  # noqa: E402
from sglang_fairkv_kernels import ragged_decode as new  # noqa: E402

G, D, P = 4, 64, 16


def batch(seed: int, slots: int, heads: int, median: float, sigma: float = 1.25):
    """Tables of one layer: lognormal lengths [slots, heads], pages scattered."""
    g = torch.Generator().manual_seed(seed)
    lens = (torch.exp(torch.randn(slots, heads, generator=g) * sigma) * median).round().long().clamp(1, 1 << 15)
    pages = -(-lens // P)
    MP = int(pages.max()) + 1
    perm = (torch.randperm(int(pages.sum()), generator=g) + 1).tolist()
    seg_pages = torch.zeros(slots, 1, heads, MP, dtype=torch.int32)
    it = iter(perm)
    for b in range(slots):
        for h in range(heads):
            for j in range(int(pages[b, h])):
                seg_pages[b, 0, h, j] = next(it)
    k = torch.randn((len(perm) + 1) * P, D, generator=g)
    v = torch.randn((len(perm) + 1) * P, D, generator=g)
    q = torch.randn(slots, heads, G, D, generator=g)
    return lens, q, k, v, seg_pages, lens.view(slots, 1, heads).to(torch.int32), torch.arange(slots)


def run(kind: str, mod, tabs) -> dict:
    lens, q, k, v, sp, sl, ri = tabs
    B, H = lens.shape
    if kind == "new":
        ws = mod.DecodeWorkspace.create(max_batch=B, num_heads=H, group=G, head_dim=D, device="cpu")
        n_prog = ws.programs_for(B)
    else:
        ws = mod.DecodeWorkspace.create(max_batch=B, num_heads=H, group=G, head_dim=D, device="cpu")
        n_prog = B * H * ws.splits_for(B)
    work = torch.zeros(n_prog, dtype=torch.int32)
    out = torch.empty_like(q)
    t = time.perf_counter()
    mod.paged_decode(q, k, v, sp, sl, ri, 0, D ** -0.5, ws, P, out=out, work=work)
    s = time.perf_counter() - t
    ref = paged_decode_reference(q, k, v, sp, sl, ri, 0, P, D ** -0.5)
    assert (out.double() - ref).abs().max() < 1e-4
    even = int(work.sum()) / n_prog
    return {"kernel": "length plan" if kind == "new" else "fixed splits (old)", "slots": B, "heads": H,
            "median": int(lens.median()), "longest": int(lens.max()), "programs": n_prog,
            "iterations": int(work.sum()), "longest_program": int(work.max()), "even_share": round(even, 2),
            "ratio": round(int(work.max()) / max(even, 1e-9), 2), "interpreter_s": round(s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-rev", default="c8eb5f7")
    ap.add_argument("--json")
    a = ap.parse_args()
    old = old_module(a.old_rev)
    rows = []
    for slots, heads, median in ((64, 2, 113), (64, 2, 1000), (256, 2, 113)):
        tabs = batch(0, slots, heads, median)
        for kind, mod in (("new", new), ("old", old)):
            rows.append(run(kind, mod, tabs))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| kernel | slots x heads | median / longest tokens | programs | longest program (iterations) | "
          "even share | longest / even | interpreter s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['slots']} x {r['heads']} | {r['median']} / {r['longest']} | {r['programs']} | "
              f"{r['longest_program']} | {r['even_share']} | {r['ratio']} | {r['interpreter_s']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
