"""Prefill on the GPU path, measured on the CPU: tensor ops per layer by batch size, and the peak
temporaries of one layer for an 8k-token chunk beside 63 short prompts.

The backend is driven directly (``test/helpers/backend_harness.py``, the SGLang interface only), with the
CUDA attention kernels replaced by stand-ins that only allocate their output (``flash_varlen`` for the
one-call path; the per-request path's flash op and SDPA): what is counted and measured is the backend's
own work around the kernel -- gathers, the K/V write, masks -- which is what runs on a GPU too.
Ops: ``torch.profiler``'s top-level aten calls of one layer (views included). Peak: the bytes allocated
and not yet freed while one layer runs (``torch.profiler`` memory records), fp32, 8 KV heads x 32 query
heads x head_dim 128 (Llama-8B at TP 1).

Modes: ``one-call`` (the CUDA path now), ``per-request`` (the CPU / fp32 path, and the only path before).
Run the per-request mode in a checkout of an older revision (``--src DIR``: its python/ and test/ first
on the path) for the before column. That is why the 8k-chunk batch is built here step by step with the harness's
oldest calls (``make_backend``, ``extend_batch``, ``qkv``) rather than through a newer shared helper: the
same scenario as ``test/test_prefill_path.py``'s memory test, at Llama-8B's head counts.

    python benchmark/prefill_ops.py [--mode one-call|per-request] [--src DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["one-call", "per-request"], default="one-call")
    ap.add_argument("--src", type=Path, default=ROOT)
    a = ap.parse_args()
    sys.path[:0] = [str(a.src / "python"), str(a.src / "kernels"), str(a.src / "test")]
    import torch
    from helpers.backend_harness import Geometry, extend_batch, layer, make_backend, qkv, top_level_ops
    from test_prefill_path import peak_bytes

    import sglang_fairkv.attention.causal as causal

    def stand_in(q, *args, **kw):
        return q.new_empty(q.shape)

    causal.scaled_dot_product_attention = lambda q, k, v, **kw: q.new_empty(q.shape[:-1] + (v.shape[-1],))
    causal.flash_usable = lambda *a: True
    causal.flash_lower_right = lambda q, k, v, scale: q.new_empty(q.shape[:-1] + (v.shape[-1],))

    def prepare(b):
        if a.mode == "one-call":
            causal.flash_varlen = lambda q, k, v, *rest: q.new_empty(q.shape[0], q.shape[1], v.shape[2])
            b.prefill_varlen = True
        return b

    geo = Geometry(layers=2, q_heads=32, kv_heads=8, head_dim=128, max_reqs=72, max_context=16384 + 64,
                   max_total_tokens=60000)
    rows = {"mode": a.mode, "src": str(a.src), "ops_per_layer": {}}
    gen = torch.Generator().manual_seed(0)
    for n in (1, 4, 16, 64):
        b = prepare(make_backend(replace(geo, max_total_tokens=20000)))
        reqs = list(range(1, n + 1))
        fb = extend_batch(b, reqs, [0] * n, [64] * n, [64] * n)
        b.init_forward_metadata(fb)
        q, k, v = qkv(geo, 64 * n, gen)
        rows["ops_per_layer"][n] = len(top_level_ops(lambda: b.forward_extend(q, k, v, layer(geo, 0), fb)))
    b = prepare(make_backend(geo))
    ly = layer(geo, 0)
    fb = extend_batch(b, [1], [0], [8192], [16384])
    b.init_forward_metadata(fb)
    b.forward_extend(*qkv(geo, 8192, gen), ly, fb)
    reqs = [1] + list(range(2, 65))
    fb = extend_batch(b, reqs, [8192] + [0] * 63, [8192] + [64] * 63, [16384] + [64] * 63)
    b.init_forward_metadata(fb)
    q, k, v = qkv(geo, 8192 + 63 * 64, gen)
    rows["peak_MiB_8k_chunk_plus_63"] = round(peak_bytes(lambda: b.forward_extend(q, k, v, ly, fb)) / 2**20, 1)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
