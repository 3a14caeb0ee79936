"""Batched prefill on the GPU path: one lower-right causal attention call per request (the flash kernel
on CUDA, GQA included), never a mask tensor with ``enable_gqa`` (which forces SDPA's math kernel), and
temporary memory bounded by one request's chunk x sequence.

CUDA's dispatch is mocked where a CPU cannot take it: ``attention/causal.py`` takes the flash op when
``flash_usable`` says so (patched True), and the flash op is replaced by a stand-in that records its
inputs and computes the exact lower-right causal GQA attention in fp64 (or, for the memory test,
returns its output buffer without computing). The CPU fallback (mask, expanded K/V) is checked against
the same reference."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers.backend_harness import Geometry, extend_batch, layer, make_backend, qkv

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
    + the attention's output and the layer's output (2 x 4160 x Hq x D x 4 B) + the batch's padded
    K/V write (2 x 2 x H x 4096 x D x 4 B + 8 B x 2 x H x 4096),

    72 MiB here (H = 2, Hq = 8, D = 64, fp32; measured 49 MiB), where the old batched call's math kernel
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
                    + 2 * 2 * H * last * D * f32 + i64 * 2 * H * last)
    got = peak_bytes(lambda: backend.forward_extend(q, k, v, ly, fb))
    assert calls["flash"][-1][:2] == ((1, Hq, last, D), (1, H, ctx, D))  # the 64-token request: square, no bias
    old_scores = 2 * Hq * last * ctx * f32
    print(f"peak temporaries {got / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
    assert got <= bound, (got, bound)
    assert bound * 100 < old_scores
    for r in (1, 2):
        backend.state.release(r)
    assert backend.pool.used_pages() == 0
