"""The backend's decode step is GPU-shaped: no host sync, one upload per step, few ops per layer, and
the answers of independent references (dense fp64 attention; the page tables read by a loop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.backend_harness import (Geometry, decode_batch, extend_batch, layer, make_backend, qkv,
                                     sync_points, top_level_ops, use_cuda_branch)

GEO = Geometry()


def dense(q, k, v, scale, causal_from=None):
    """fp64 GQA attention: q [n, Hq, D] over k / v [t, H, D]; ``causal_from``: query i sits at
    position ``causal_from + i`` (None: sees every key)."""
    n, hq, d = q.shape
    g = hq // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1).transpose(0, 1)  # [Hq, t, D]
    vv = v.double().repeat_interleave(g, dim=1).transpose(0, 1)
    logits = torch.einsum("nhd,htd->hnt", q.double(), kk) * scale
    if causal_from is not None:
        pos = torch.arange(k.shape[0])
        logits = logits.masked_fill(pos[None, None, :] > (causal_from + torch.arange(n))[None, :, None], float("-inf"))
    return torch.einsum("hnt,htd->nhd", torch.softmax(logits, -1), vv)


def run_prefill(backend, chunks, gen, kv_log=None):
    """``chunks``: list of forward batches, each a list of (req, prefix, ext, target). Returns the
    extend outputs per batch; logs every request's K/V per layer into ``kv_log``."""
    outs = []
    for batch in chunks:
        fb = extend_batch(backend, [c[0] for c in batch], [c[1] for c in batch], [c[2] for c in batch],
                          [c[3] for c in batch])
        backend.init_forward_metadata(fb)
        T = sum(c[2] for c in batch)
        per_layer = []
        for lid in range(GEO.layers):
            q, k, v = qkv(GEO, T, gen)
            per_layer.append((q, k, v, backend.forward_extend(q, k, v, layer(GEO, lid), fb)))
            if kv_log is not None:
                s = 0
                for r, _, e, _ in batch:
                    kv_log.setdefault((r, lid), []).append((k[s:s + e], v[s:s + e], q[s:s + e]))
                    s += e
        outs.append(per_layer)
    return outs


def test_prefill_batched_and_decode_equal_dense_attention():
    """No compression: a batched prefill (three requests of different lengths, one chunked over two
    forwards) and ten decode steps (one crossing a page boundary) run with every host-sync entry
    point raising, at most one upload per step, and equal dense fp64 attention over everything
    written."""
    backend = make_backend(GEO)
    gen = torch.Generator().manual_seed(0)
    log = {}
    chunks = [[(3, 0, 20, 40), (5, 0, 7, 7), (1, 0, 23, 23)], [(3, 20, 20, 40)]]
    outs = run_prefill(backend, chunks, gen, log)
    hd, scale = GEO.head_dim, GEO.head_dim ** -0.5
    for lid in range(GEO.layers):  # the chunked request's second chunk sees its first
        q, k, v, o = outs[1][lid]
        k_all = torch.cat([x[0] for x in log[(3, lid)]]).view(-1, GEO.kv_heads, hd)
        v_all = torch.cat([x[1] for x in log[(3, lid)]]).view(-1, GEO.kv_heads, hd)
        ref = dense(q.view(-1, GEO.q_heads, hd), k_all, v_all, scale, causal_from=20)
        assert (o.view(-1, GEO.q_heads, hd).double() - ref).abs().max() < 1e-5
        q, k, v, o = outs[0][lid]  # batch of three: request 5's tokens sit at 20..26
        ref = dense(q[20:27].view(-1, GEO.q_heads, hd), k[20:27].view(-1, GEO.kv_heads, hd),
                    v[20:27].view(-1, GEO.kv_heads, hd), scale, causal_from=0)
        assert (o[20:27].view(-1, GEO.q_heads, hd).double() - ref).abs().max() < 1e-5
    reqs = [1, 3, 5]
    steps_with_upload = 0
    for step in range(10):
        fb = decode_batch(backend, reqs)
        uploads = backend.pool.uploads
        with sync_points("raise"):
            backend.init_forward_metadata(fb)
        assert backend.pool.uploads - uploads <= 1
        steps_with_upload += backend.pool.uploads - uploads
        for lid in range(GEO.layers):
            q, k, v = qkv(GEO, len(reqs), gen)
            with sync_points("raise"):
                o = backend.forward_decode(q, k, v, layer(GEO, lid), fb)
            for i, r in enumerate(reqs):
                log[(r, lid)].append((k[i:i + 1], v[i:i + 1], None))
                k_all = torch.cat([x[0] for x in log[(r, lid)]]).view(-1, GEO.kv_heads, hd)
                v_all = torch.cat([x[1] for x in log[(r, lid)]]).view(-1, GEO.kv_heads, hd)
                ref = dense(q[i].view(1, GEO.q_heads, hd), k_all, v_all, scale)
                assert (o[i].view(1, GEO.q_heads, hd).double() - ref).abs().max() < 1e-5, (step, lid, r)
    assert steps_with_upload >= 1  # request 5 reached 16 tokens: new pages went up in that step's copy
    assert backend.state.host_index_readbacks == 0
    for r in reqs:
        backend.state.release(r)
    assert backend.pool.used_pages() == 0


@pytest.fixture(params=[None, torch.float8_e4m3fn], ids=["model-dtype-rows", "fp8-rows"])
def compressed(request):
    """AdaKV at ratio 0.5 after a batched prefill of prompts of 64..100 tokens: skewed kept lengths;
    rows in the model's dtype, or fp8 (``--kv-cache-dtype fp8_e4m3``: quantised writes, the same
    sync-free step)."""
    backend = make_backend(GEO, method="adakv", ratio=0.5, store_dtype=request.param)
    gen = torch.Generator().manual_seed(1)
    run_prefill(backend, [[(2, 0, 64, 64), (7, 0, 100, 100), (4, 0, 81, 81)]], gen)
    yield backend, gen
    for r in (2, 4, 7):
        backend.state.release(r)
    assert backend.pool.used_pages() == 0


def test_compressed_decode_is_sync_free_and_reads_the_tables(compressed):
    backend, gen = compressed
    pool, reqs = backend.pool, [7, 2, 4]
    kept = pool.seg_len_host[reqs]
    assert len(np.unique(kept)) > 3, "AdaKV should leave heads of different lengths"
    from helpers.decode_reference import paged_decode_reference

    for step in range(3):
        fb = decode_batch(backend, reqs)
        with sync_points("raise"):
            backend.init_forward_metadata(fb)
        for lid in range(GEO.layers):
            q, k, v = qkv(GEO, len(reqs), gen)
            with sync_points("raise"):
                o = backend.forward_decode(q, k, v, layer(GEO, lid), fb)
            qg = q.view(len(reqs), GEO.kv_heads, -1, GEO.head_dim)
            ref = paged_decode_reference(qg, pool.k_rows, pool.v_rows, pool.seg_pages, pool.seg_len,
                                         torch.tensor(reqs), lid, pool.page_size, GEO.head_dim ** -0.5)
            assert (o.view_as(qg).double() - ref).abs().max() < 1e-5
    assert np.array_equal(pool.seg_len_host[reqs], kept + 3)


def test_triton_path_in_the_backend_equals_torch_path(compressed):
    """The backend's CUDA branch (split-KV ``paged_decode`` with the static workspace, interpreted) gives the CPU branch's outputs for the same step."""
    from sglang_fairkv.attention.fairkv_backend import DecodeMetadata

    backend, gen = compressed
    pool, reqs = backend.pool, [4, 7, 2]
    use_cuda_branch(backend, min_split=32, block_n=16)  # segments of a few splits each
    fb = decode_batch(backend, reqs)
    backend.init_forward_metadata(fb)
    md = backend.forward_metadata
    assert md.max_len is None  # the kernel takes no host lengths
    max_len = pool.seg_len_host[reqs].max(axis=(0, 2)).tolist()
    for lid in range(GEO.layers):
        q, k, v = qkv(GEO, len(reqs), gen)
        backend.decode_kernel, backend.forward_metadata = "triton", md
        o_tri = backend.forward_decode(q, k, v, layer(GEO, lid), fb)
        backend.decode_kernel = "torch"  # same step, same rows written again
        backend.forward_metadata = DecodeMetadata(md.req_pool_idx, md.write_rows, md.lens, max_len)
        o_ref = backend.forward_decode(q, k, v, layer(GEO, lid), fb)
        assert (o_tri.double() - o_ref.double()).abs().max() < 1e-5


def test_op_budget_per_layer_and_per_step(compressed):
    """The CUDA branch issues at most 10 tensor ops per layer (12 over fp8 rows) (the two kernel launches counted as
    ops; here a stand-in that allocates the output), and the step's metadata a bounded number (the
    host bookkeeping, the upload's scatters, write rows of every layer at once)."""
    backend, gen = compressed
    reqs = [2, 4, 7]
    use_cuda_branch(backend, kernel=lambda q, *a, **k: torch.empty_like(q))  # stands for the two launches
    fb = decode_batch(backend, reqs)
    step_ops = top_level_ops(lambda: backend.init_forward_metadata(fb))
    q, k, v = qkv(GEO, len(reqs), gen)
    layer_ops = top_level_ops(lambda: backend.forward_decode(q, k, v, layer(GEO, 1), fb))
    # fp8 rows: two casts quantise K and V (kernels) and two uint8 views of them (metadata only)
    assert len(layer_ops) - 1 + 2 <= (12 if backend.pool.quantized else 10), layer_ops
    assert len(step_ops) <= 60, step_ops  # device ops + host-side tensor ops (ledger, index views)


def test_step_ops_do_not_grow_with_layers():
    """The step's metadata issues the same tensor ops for 4 and for 16 layers (the write rows and chunk
    tables of every layer come from whole-batch ops; per-layer views from one ``unbind``)."""
    from dataclasses import replace

    counts = []
    for layers in (4, 16):
        geo = replace(GEO, layers=layers)
        backend = make_backend(geo)
        gen = torch.Generator().manual_seed(3)
        fb = extend_batch(backend, [1, 2], [0, 0], [33, 16], [33, 16])
        backend.init_forward_metadata(fb)
        for lid in range(layers):
            q, k, v = qkv(geo, 49, gen)
            backend.forward_extend(q, k, v, layer(geo, lid), fb)
        use_cuda_branch(backend)
        fb = decode_batch(backend, [1, 2])
        counts.append(len(top_level_ops(lambda: backend.init_forward_metadata(fb))))
    assert counts[0] == counts[1], counts
