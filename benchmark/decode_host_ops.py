"""Host cost of the fairkv backend's decode step on the CPU: tensor ops and host microseconds per layer,
tensor ops per step (eager metadata, and the out-of-graph part of a CUDA-graph replay), host syncs per
step; and the host syncs of one compressed prompt's prefill (snapkv, adakv, pyramidkv).

The backend is driven through its SGLang interface (``test/helpers/backend_harness.py``: the real
``FairKVAttnBackend`` over a real ``FairKVCache``; no server, no model), so the same script measures
an older tree: ``PYTHONPATH=<old tree>/python python benchmark/decode_host_ops.py``. The CUDA branch
is measured with its attention kernel replaced by a stand-in that allocates the output (the launch
itself is not host work we can see on a CPU); the torch branch (what the CPU server runs) is measured
whole. Syncs: calls of ``item``, ``tolist``, ``__bool__``, ``__int__``, ``nonzero``, ``cpu`` ...
(counted by wrapping them) during the step's metadata and every layer.

    python benchmark/decode_host_ops.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "test"))

from helpers.backend_harness import (Geometry, decode_batch, extend_batch, layer, make_backend, qkv,  # noqa: E402
                                     sync_points, top_level_ops, use_cuda_branch)

SHAPES = {
    "smollm2-135m": Geometry(layers=30, q_heads=9, kv_heads=3, head_dim=64, max_reqs=40, max_context=2048,
                             max_total_tokens=40000),
    "llama-70b-tp8-rank": Geometry(layers=80, q_heads=8, kv_heads=1, head_dim=128, max_reqs=40,
                                   max_context=2048, max_total_tokens=40000),
}


def measure(name: str, geo: Geometry, batch: int, prompt: int, steps: int, kernel: str) -> dict:
    torch.manual_seed(0)
    backend = make_backend(geo, method="adakv", ratio=0.5, window=32)
    gen = torch.Generator().manual_seed(0)
    reqs = list(range(1, batch + 1))
    for i in range(0, batch, 8):  # prefill in batches of 8 prompts
        part = reqs[i:i + 8]
        fb = extend_batch(backend, part, [0] * len(part), [prompt] * len(part), [prompt] * len(part))
        backend.init_forward_metadata(fb)
        for lid in range(geo.layers):
            q, k, v = qkv(geo, prompt * len(part), gen)
            backend.forward_extend(q, k, v, layer(geo, lid), fb)
    if kernel == "triton":  # the CUDA branch with the kernel launch replaced by a stand-in
        if hasattr(backend, "workspace"):  # trees with the page-table kernel's static workspace
            use_cuda_branch(backend, kernel=lambda q, *a, **k: torch.empty_like(q))
        else:  # older trees (CSR rows per layer, then the kernel): for before / after comparisons
            backend.decode_kernel = "triton"
            backend._ragged_decode = lambda q, *a, **k: torch.empty_like(q)
    layers = [layer(geo, lid) for lid in range(geo.layers)]
    q, k, v = qkv(geo, batch, gen)
    syncs: dict[str, int] = {}
    meta_s = layer_s = 0.0
    for step in range(steps + 1):
        fb = decode_batch(backend, reqs)
        counter: dict[str, int] = {}
        with sync_points("count", counter):
            t0 = time.perf_counter()
            backend.init_forward_metadata(fb)
            t1 = time.perf_counter()
            for ly in layers:
                backend.forward_decode(q, k, v, ly, fb)
            t2 = time.perf_counter()
        if step:  # step 0 warms up
            meta_s += t1 - t0
            layer_s += t2 - t1
            for key, n in counter.items():
                syncs[key] = syncs.get(key, 0) + n
    fb = decode_batch(backend, reqs)
    step_ops = len(top_level_ops(lambda: backend.init_forward_metadata(fb)))
    layer_ops = len(top_level_ops(lambda: backend.forward_decode(q, k, v, layers[1], fb)))
    replay_ops = None
    if kernel == "triton":
        layer_ops += 1  # the stand-in (1 op) stands for two launches (partials + merge)
        backend.init_cuda_graph_state(batch, batch)  # the out-of-graph part of a CUDA-graph replay
        fbg = decode_batch(backend, reqs)
        fbg.batch_size, fbg.num_padding = batch, 0
        replay_ops = len(top_level_ops(lambda: backend.init_forward_metadata_out_graph(fbg)))
        fused = fused_step_ops(backend, reqs, fbg)
    pool = backend.pool
    kept = int(pool.seg_len_host.sum()) if hasattr(pool, "seg_len_host") else int(pool.seg_len.sum())
    return {"shape": name, "branch": kernel, "batch": batch, "prompt": prompt, "layers": geo.layers,
            "kept_rows": kept, "step_ops": step_ops, "replay_ops": replay_ops, "layer_ops": layer_ops,
            **(fused if kernel == "triton" else {}),
            "meta_us_per_step": meta_s / steps * 1e6, "layer_us": layer_s / steps / geo.layers * 1e6,
            "syncs_per_step": sum(syncs.values()) / steps,
            "sync_kinds": {k2: n / steps for k2, n in sorted(syncs.items())}}


def fused_step_ops(backend, reqs, fbg) -> dict:
    """Ops of the eager metadata and of a graph replay's out-of-graph part with the pool's fused step (the
    CUDA path: two Triton launches, here stand-ins counted as one op each, since the interpreter's own
    work is not what a GPU would launch). The two kernels are checked for equality with the torch step
    in test/test_graph_and_overlap.py."""
    import sglang_fairkv_kernels as kern

    saved = kern.apply_table_writes, kern.decode_step
    launches = []

    def stub(name):
        def f(*a, **k):
            launches.append(name)
            torch.empty(0)  # one op, as the profiler sees a launch
        return f

    kern.apply_table_writes, kern.decode_step = stub("apply_table_writes"), stub("decode_step")
    backend.pool.fused_step = True
    try:
        eager = len(top_level_ops(lambda: backend.init_forward_metadata(decode_batch(backend, reqs))))
        replay = len(top_level_ops(lambda: backend.init_forward_metadata_out_graph(fbg)))
    finally:
        kern.apply_table_writes, kern.decode_step = saved
        backend.pool.fused_step = False
    return {"fused_step_ops": eager, "fused_replay_ops": replay, "fused_launches_per_step": len(launches) // 2}


def prefill_syncs(name: str, geo: Geometry, method: str, prompt: int) -> dict:
    """Host syncs (the wrapped entry points) of one compressed prompt's prefill at TP 1: the metadata
    and every layer's forward of its only chunk (where compression runs), per kind."""
    torch.manual_seed(0)
    backend = make_backend(geo, method=method, ratio=0.5, window=32)
    gen = torch.Generator().manual_seed(0)
    fb = extend_batch(backend, [1], [0], [prompt], [prompt])
    qkvs = [qkv(geo, prompt, gen) for _ in range(geo.layers)]
    counter: dict[str, int] = {}
    with sync_points("count", counter):
        backend.init_forward_metadata(fb)
        for lid in range(geo.layers):
            backend.forward_extend(*qkvs[lid], layer(geo, lid), fb)
    uploads = backend.pool.uploads
    return {"shape": name, "method": method, "prompt": prompt, "layers": geo.layers,
            "syncs": sum(counter.values()), "sync_kinds": dict(sorted(counter.items())), "uploads": uploads}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    rows = []
    for name, geo in SHAPES.items():
        for kernel in ("triton", "torch"):
            rows.append(measure(name, geo, a.batch, a.prompt, a.steps, kernel))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| shape | branch | ops / layer | host us / layer | ops / step (metadata) | ops / graph replay "
          "(out of graph) | fused step: ops / step, / replay | metadata us / step | syncs / step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fz = f"{r['fused_step_ops']}, {r['fused_replay_ops']}" if "fused_step_ops" in r else "-"
        print(f"| {r['shape']} | {r['branch']} | {r['layer_ops']} | {r['layer_us']:.0f} | {r['step_ops']} | "
              f"{r.get('replay_ops') if r.get('replay_ops') is not None else '-'} | {fz} | "
              f"{r['meta_us_per_step']:.0f} | {r['syncs_per_step']:.0f} |")
    pre = [prefill_syncs(name, geo, m, a.prompt) for name, geo in SHAPES.items()
           for m in ("snapkv", "adakv", "pyramidkv")]
    print("\n| shape | method | prompt | host syncs (prefill, all layers) | kinds | uploads |")
    print("|---|---|---|---|---|---|")
    for r in pre:
        print(f"| {r['shape']} | {r['method']} | {r['prompt']} | {r['syncs']} | {r['sync_kinds']} | {r['uploads']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"decode": rows, "prefill": pre}, f, indent=1)


if __name__ == "__main__":
    main()
