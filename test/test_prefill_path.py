"""Batched prefill on the GPU paths.

The one-call path (CUDA, fp16 / bf16): one varlen flash call per layer over every request's keys packed
with ``cu_seqlens``, the K/V write packed with no padding; checked on the CPU with the kernel replaced by
an fp64 stand-in (``helpers.backend_harness.use_varlen``): outputs and kept segments equal the
per-request path's, one call per layer, tensor ops per layer independent of the number of requests
(``torch.profiler``), peak temporaries of one 8k chunk beside 63 short prompts within a stated bound,
no host sync.

The per-request path (CPU, fp32 on CUDA): one lower-right causal attention call per request (the flash
kernel on CUDA, GQA included), never a mask tensor with ``enable_gqa`` (which forces SDPA's math kernel),
and temporary memory bounded by one request's chunk x sequence.

CUDA's dispatch is mocked where a CPU cannot take it: ``attention/causal.py`` takes the flash op when
``flash_usable`` says so (patched True), and the flash op is replaced by a stand-in that records its
inputs and computes the exact lower-right causal GQA attention in fp64 (or, for the memory test,
returns its output buffer without computing). The CPU fallback (mask, expanded K/V) is checked against
the same reference."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers.backend_harness import (Geometry, extend_batch, layer, make_backend, qkv, segments, sync_points,
                                     top_level_ops, use_varlen)

GEO = Geometry(layers=2, q_heads=8, kv_heads=2, head_dim=16)


def lower_right_gqa(q, k, v, scale):
    """fp64 reference: q [B, Hq, n, D] over k / v [B, H, t, D], query i at position t - n + i."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    n, t = q.shape[2], k.shape[2]
    logits = q.double() @ kk.transpose(-1, -2) * scale
    allowed = torch.arange(t)[None, :] <= (t - n + torch.arange(n))[:, None]
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ vv


@pytest.fixture(params=["flash"])
def cuda_dispatch(monkeypatch, request):
    """The prefill attention's CUDA dispatch as a CPU can take it: flash reported usable, the flash op
    (``flash_lower_right``) a stand-in, and a recorder on every SDPA call (it raises on a mask tensor given with
    ``enable_gqa``, the pair only SDPA's math kernel takes on CUDA)."""
    calls = {"flash": [], "sdpa": []}
    compute = {"on": True}

    def flash(q, k, v, scale):
        calls["flash"].append((tuple(q.shape), tuple(k.shape), True))
        assert q.shape[1] % k.shape[1] == 0
        return lower_right_gqa(q, k, v, scale).to(q.dtype) if compute["on"] else q.new_zeros(q.shape)

    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls["sdpa"].append((attn_mask is not None, is_causal, enable_gqa))
        if attn_mask is not None and enable_gqa:
            raise AssertionError("SDPA called with a mask tensor and enable_gqa: the math kernel on CUDA")
        return real_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)

    import sglang_fairkv.attention.causal as causal

    monkeypatch.setattr(causal, "flash_usable", lambda q, k, v, gqa: request.param == "flash")
    monkeypatch.setattr(causal, "flash_lower_right", flash)
    monkeypatch.setattr(causal, "scaled_dot_product_attention", sdpa)
    return calls, compute


@pytest.mark.parametrize("cuda_dispatch", ["flash", "fallback"], indirect=True)
def test_batched_prefill_is_one_flash_call_per_request_and_exact(cuda_dispatch, request):
    """Three requests in one forward (one a later chunk over its own earlier one): every attention goes
    to the flash kernel with the request's own GQA shapes (no mask, no padding), or, where flash cannot
    run (the CPU, fp32 on CUDA), to SDPA with one request's mask and K/V expanded (never a mask with
    ``enable_gqa``); the outputs equal fp64 lower-right causal attention over what each request wrote."""
    calls, _ = cuda_dispatch
    fallback = request.node.callspec.params["cuda_dispatch"] == "fallback"
    backend = make_backend(GEO)
    gen = torch.Generator().manual_seed(0)
    log: dict = {}

    def forward(batch):
        fb = extend_batch(backend, [c[0] for c in batch], [c[1] for c in batch], [c[2] for c in batch],
                          [c[3] for c in batch])
        backend.init_forward_metadata(fb)
        outs = []
        for lid in range(GEO.layers):
            q, k, v = qkv(GEO, sum(c[2] for c in batch), gen)
            outs.append((q, backend.forward_extend(q, k, v, layer(GEO, lid), fb)))
            s = 0
            for r, _, e, _ in batch:
                log.setdefault((r, lid), []).append((k[s:s + e], v[s:s + e]))
                s += e
        return outs

    forward([(3, 0, 24, 40)])
    calls["flash"].clear()
    batch = [(3, 24, 16, 40), (5, 0, 7, 7), (1, 0, 30, 30)]
    outs = forward(batch)
    D, Hq, H = GEO.head_dim, GEO.q_heads, GEO.kv_heads
    # the 16-over-40 chunk takes the flash op (lower-right); the square ones SDPA's causal flag, no mask
    square = [(False, True, True)] * (2 * GEO.layers + GEO.layers)  # (mask, is_causal, enable_gqa)
    if fallback:
        assert calls["flash"] == [] and calls["sdpa"].count((True, False, False)) == GEO.layers
    else:
        assert calls["flash"] == [((1, Hq, 16, D), (1, H, 40, D), True)] * GEO.layers
        assert calls["sdpa"] == square, calls["sdpa"]
    for lid, (q, o) in enumerate(outs):
        s = 0
        for r, pre, e, _ in batch:
            k = torch.cat([x[0] for x in log[(r, lid)]]).view(-1, H, D).transpose(0, 1)[None]
            v = torch.cat([x[1] for x in log[(r, lid)]]).view(-1, H, D).transpose(0, 1)[None]
            ref = lower_right_gqa(q[s:s + e].view(e, Hq, D).transpose(0, 1)[None], k, v, D ** -0.5)
            got = o[s:s + e].view(e, Hq, D).transpose(0, 1)[None]
            assert (got.double() - ref).abs().max() < 1e-5, (r, lid)
            s += e


def peak_bytes(fn) -> int:
    """Peak of the bytes allocated and not yet freed while ``fn`` runs (torch.profiler's memory
    records: each op's own allocations at its start, each free at its time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    pts = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                 for e in prof.events() if (e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage))
    cur = best = 0
    for _, m in pts:
        cur += m
        best = max(best, cur)
    return best


def test_batched_prefill_peak_temporaries_are_one_requests_chunk(cuda_dispatch):
    """b = 2: the last 4096-token chunk of a 32k prompt batched with a new 64-token request. One
    layer's forward allocates at most ``bound`` bytes of temporaries, 1.25 x the sum of

    the request's gathered K and V (2 x H x 32768 x D x 4 B) + its row indices (3 x 8 B x H x 32768)
    + the attention's output and the layer's output (2 x 4160 x Hq x D x 4 B) + the batch's packed
    K/V write's rows (3 x 8 B x H x 4160),

    about 70 MiB here (H = 2, Hq = 8, D = 64, fp32), where the old batched call's math kernel
    needed fp32 scores of ``b x Hq x 4096 x 32768`` (8 GiB) per intermediate."""
    calls, compute = cuda_dispatch
    compute["on"] = False  # the stand-in flash op returns its output buffer without computing
    geo = replace(GEO, layers=1, head_dim=64, max_reqs=4, max_context=32768 + 64, max_total_tokens=40000)
    backend = make_backend(geo)
    gen = torch.Generator().manual_seed(1)
    ly = layer(geo, 0)
    ctx, last, new = 32768, 4096, 64
    for pre in range(0, ctx - last, 8192):  # the prompt's earlier chunks
        e = min(8192, ctx - last - pre)
        fb = extend_batch(backend, [1], [pre], [e], [ctx])
        backend.init_forward_metadata(fb)
        backend.forward_extend(*qkv(geo, e, gen), ly, fb)
    fb = extend_batch(backend, [1, 2], [ctx - last, 0], [last, new], [ctx, new])
    backend.init_forward_metadata(fb)
    q, k, v = qkv(geo, last + new, gen)
    H, Hq, D, f32, i64 = geo.kv_heads, geo.q_heads, geo.head_dim, 4, 8
    bound = 1.25 * (2 * H * ctx * D * f32 + 3 * i64 * H * ctx + 2 * (last + new) * Hq * D * f32
                    + 3 * i64 * H * (last + new))
    got = peak_bytes(lambda: backend.forward_extend(q, k, v, ly, fb))
    assert calls["flash"][-1][:2] == ((1, Hq, last, D), (1, H, ctx, D))  # the 64-token request: square, no bias
    old_scores = 2 * Hq * last * ctx * f32
    print(f"peak temporaries {got / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
    assert got <= bound, (got, bound)
    assert bound * 100 < old_scores
    for r in (1, 2):
        backend.state.release(r)
    assert backend.pool.used_pages() == 0


def _run_batches(backend, batches, seed: int):
    """Forward ``batches`` (each a list of ``(req, prefix, ext, target)``) through every layer; returns
    the outputs per (batch, layer)."""
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for batch in batches:
        fb = extend_batch(backend, [c[0] for c in batch], [c[1] for c in batch], [c[2] for c in batch],
                          [c[3] for c in batch])
        backend.init_forward_metadata(fb)
        for lid in range(GEO.layers):
            q, k, v = qkv(GEO, sum(c[2] for c in batch), gen)
            outs.append(backend.forward_extend(q, k, v, layer(GEO, lid), fb))
    return outs


@pytest.mark.parametrize("method,ratio", [("none", None), ("snapkv", 0.5), ("adakv", 0.6)])
def test_varlen_prefill_is_one_call_per_layer_and_equals_the_per_request_path(method, ratio, monkeypatch):
    """A later chunk over its own earlier one beside two whole prompts (and, first, a chunked prompt
    alone): the one-call path makes exactly one varlen call per layer with every request packed (T
    queries, K = sum of sequence lengths keys, b + 1 offsets), and its outputs and every kept segment
    equal the per-request path's (itself exact against fp64 above and kvpress in the server tests)."""
    batches = [[(3, 0, 24, 40)], [(3, 24, 16, 40), (5, 0, 27, 27), (1, 0, 30, 30)]]
    ref = make_backend(GEO, method, ratio)
    want = _run_batches(ref, batches, seed=4)
    one = make_backend(GEO, method, ratio)
    calls: list = []
    use_varlen(one, monkeypatch, calls=calls)
    got = _run_batches(one, batches, seed=4)
    assert calls == [(24, 24, GEO.q_heads, GEO.kv_heads, 24, 24, 1)] * GEO.layers + \
        [(16 + 27 + 30, 40 + 27 + 30, GEO.q_heads, GEO.kv_heads, 30, 40, 3)] * GEO.layers
    for w, g in zip(want, got):
        assert (w - g).abs().max() < 1e-5
    for (n0, k0, v0), (n1, k1, v1) in zip(segments(ref, (1, 3, 5)), segments(one, (1, 3, 5))):
        assert n0 == n1 and torch.equal(k0, k1) and torch.equal(v0, v1)
    if method != "none":
        assert one.pool.seg_len_host[1].max() < 30  # really compressed


@pytest.mark.parametrize("method,ratio", [("none", None), ("adakv", 0.6)])
def test_varlen_prefill_with_fp8_rows_equals_the_per_request_path(method, ratio, monkeypatch):
    """fp8 rows (``--kv-cache-dtype fp8_e4m3``): both paths attend (and score) a chunk's own K/V
    unrounded and its earlier chunk's as stored -- the one-call path by one scatter of the chunk's keys
    into the gathered ones (``tok_key``) -- and keep the same fp8 rows; the rounding changes the
    outputs (vs fp32 rows) where an earlier chunk is read, and nowhere else."""
    batches = [[(3, 0, 24, 40)], [(3, 24, 16, 40), (5, 0, 27, 27), (1, 0, 30, 30)]]
    ref = make_backend(GEO, method, ratio, store_dtype=torch.float8_e4m3fn)
    want = _run_batches(ref, batches, seed=4)
    one = make_backend(GEO, method, ratio, store_dtype=torch.float8_e4m3fn)
    use_varlen(one, monkeypatch)
    got = _run_batches(one, batches, seed=4)
    for w, g in zip(want, got):
        assert (w - g).abs().max() < 1e-5
    for (n0, k0, v0), (n1, k1, v1) in zip(segments(ref, (1, 3, 5)), segments(one, (1, 3, 5))):
        assert n0 == n1 and torch.equal(k0, k1) and torch.equal(v0, v1)
    assert one.pool.k_rows.dtype == torch.float8_e4m3fn
    dense = _run_batches(make_backend(GEO, method, ratio), batches, seed=4)
    L = GEO.layers
    for lid in range(L):
        w, d = want[L + lid], dense[L + lid]  # batch 2: request 3's second chunk, then 5 and 1 whole
        assert (w[:16] - d[:16]).abs().max() > 1e-3  # it reads its first chunk's rows as stored
        assert (w[16:] - d[16:]).abs().max() < 1e-6  # one-chunk prompts attend their own K/V unrounded
        assert (want[lid] - dense[lid]).abs().max() < 1e-6


def test_varlen_prefill_zeroes_the_query_heads_of_segments_held_elsewhere(monkeypatch):
    """A request that holds only some KV heads of a layer here (a copied head served by another
    replica): its other query heads give zeros on both paths, the rest is equal."""
    outs = []
    for varlen in (False, True):
        b = make_backend(GEO)
        if varlen:
            use_varlen(b, monkeypatch)
        for r in (2, 4):
            b.state.admit(r, f"req{r}", 20)
        mask = b.pool.active_host[4].copy()
        mask[1, 0] = False  # request 4 does not hold head 0 of layer 1 here
        b.pool.set_active(4, mask)
        outs.append(_run_batches(b, [[(2, 0, 12, 12), (4, 0, 20, 20)]], seed=6))
    g = GEO.q_heads // GEO.kv_heads
    for w, o in zip(*outs):
        assert (w - o).abs().max() < 1e-5
    held_elsewhere = outs[1][1][12:].view(20, GEO.q_heads, GEO.head_dim)[:, :g]
    assert held_elsewhere.abs().max() == 0 and outs[1][1][12:].abs().max() > 0


def _layer_ops(backend, n_reqs: int, ext: int, gen, target: int) -> list[str]:
    fb = extend_batch(backend, list(range(n_reqs)), [0] * n_reqs, [ext] * n_reqs, [target] * n_reqs)
    backend.init_forward_metadata(fb)
    q, k, v = qkv(GEO, n_reqs * ext, gen)
    ops = top_level_ops(lambda: backend.forward_extend(q, k, v, layer(GEO, 0), fb))
    for lid in range(1, GEO.layers):
        backend.forward_extend(q, k, v, layer(GEO, lid), fb)
    for r in range(n_reqs):
        backend.state.release(r)
    return ops


@pytest.mark.parametrize("tier", [0.0, 1.0])
def test_varlen_prefill_ops_per_layer_do_not_grow_with_the_batch(tier, monkeypatch):
    """Tensor ops of one prefill layer on the one-call path (``torch.profiler``'s top-level aten calls,
    views included) for 1, 4 and 12 requests: the same list. The per-request path's grows with the
    batch (checked too, so the counter can tell). With the prefix tier (``tier=1.0``) the chunks are
    not their prompts' last (the tier rows are written and read in the same ops; a prompt's last chunk
    fills its segments from the tier per request, like compression: see README "On GPUs")."""
    import numpy as np

    geo = replace(GEO, max_reqs=16, max_total_tokens=16384)
    counts = {}
    for varlen in (True, False):
        b = make_backend(geo, prefix_tier=tier)
        if varlen:
            use_varlen(b, monkeypatch, compute=False)
        gen = torch.Generator().manual_seed(2)
        for n in (1, 4, 12):
            if tier:
                for r in range(n):
                    b.state.admit(r, f"req{r}", 40)
                    b.state.tier_begin(r, np.zeros(0, dtype=np.int64))
            counts[varlen, n] = _layer_ops(b, n, 20, gen, target=40 if tier else 20)
    assert counts[True, 1] == counts[True, 4] == counts[True, 12], {n: len(counts[True, n]) for n in (1, 4, 12)}
    assert len(counts[False, 12]) > len(counts[False, 4]) > len(counts[False, 1])
    print(f"ops per prefill layer (tier={tier}): one-call {len(counts[True, 12])} at 1 / 4 / 12 requests; "
          f"per request {[len(counts[False, n]) for n in (1, 4, 12)]}")


def test_varlen_prefill_is_sync_free(monkeypatch):
    """Every layer of a compressed batch's forward (a chunk over its prefix, whole prompts) on the
    one-call path issues no host sync but AdaKV's one read of its kept counts per layer (counted)."""
    b = make_backend(GEO, "snapkv", 0.5)
    use_varlen(b, monkeypatch, compute=False)
    _run_batches(b, [[(3, 0, 24, 40)]], seed=1)
    gen = torch.Generator().manual_seed(3)
    batch = [(3, 24, 16, 40), (5, 0, 27, 27), (1, 0, 30, 30)]
    fb = extend_batch(b, [c[0] for c in batch], [c[1] for c in batch], [c[2] for c in batch], [c[3] for c in batch])
    b.init_forward_metadata(fb)
    inputs = [qkv(GEO, 73, gen) for _ in range(GEO.layers)]
    with sync_points("raise"):
        for lid, (q, k, v) in enumerate(inputs):
            b.forward_extend(q, k, v, layer(GEO, lid), fb)
    assert b.pool.seg_len_host[1].max() < 30


def test_varlen_prefill_peak_temporaries_of_a_long_chunk_beside_63_short_prompts(monkeypatch):
    """One layer of a batch with an 8192-token chunk over an 8192-token prefix and 63 prompts of 64
    tokens (T = 12224 new tokens, K = 20416 keys) allocates at most ``bound`` bytes of temporaries,
    1.25 x the sum of

    the packed gathered K and V (2 x K x H x D x 4 B) + the key rows (3 x 8 B x K x H) + the write rows
    (3 x 8 B x T x H) + the attention's and the layer's output (2 x T x Hq x D x 4 B),

    where the old padded write alone was 2 x 64 x 8192 x H x D x 4 B (K and V padded to the longest
    chunk) plus its ``[64, H, 8192]`` int64 rows."""
    calls: list = []
    geo = replace(GEO, layers=1, head_dim=64, max_reqs=72, max_context=16384 + 64, max_total_tokens=40000)
    b = make_backend(geo)
    use_varlen(b, monkeypatch, compute=False, calls=calls)
    gen = torch.Generator().manual_seed(1)
    ly = layer(geo, 0)
    fb = extend_batch(b, [1], [0], [8192], [16384])
    b.init_forward_metadata(fb)
    b.forward_extend(*qkv(geo, 8192, gen), ly, fb)
    reqs = [1] + list(range(2, 65))
    fb = extend_batch(b, reqs, [8192] + [0] * 63, [8192] + [64] * 63, [16384] + [64] * 63)
    b.init_forward_metadata(fb)
    T, K = 8192 + 63 * 64, 16384 + 63 * 64
    q, k, v = qkv(geo, T, gen)
    H, Hq, D, f32, i64 = geo.kv_heads, geo.q_heads, geo.head_dim, 4, 8
    bound = 1.25 * (2 * K * H * D * f32 + 3 * i64 * K * H + 3 * i64 * T * H + 2 * T * Hq * D * f32)
    got = peak_bytes(lambda: b.forward_extend(q, k, v, ly, fb))
    assert calls[-1] == (T, K)
    old_padded = 2 * 64 * 8192 * H * D * f32 + i64 * 64 * H * 8192
    print(f"peak temporaries {got / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, old padded write "
          f"{old_padded / 2**20:.1f} MiB")
    assert got <= bound, (got, bound)
    assert bound * 3 < old_padded
    for r in reqs:
        b.state.release(r)
    assert b.pool.used_pages() == 0
