"""Plan-free split-KV decode attention over ragged per-head segments, with a fused LSE merge.

Layout (token-granular ragged pool, the layout of the ``fairkv`` KV pool): one *segment* per
(request, KV head) — in a layer, request ``b``'s KV head ``h`` is segment ``s = b * H + h`` (or any
order the caller likes). A segment is a list of rows of the pool, each row one token of one head::

    k_pool, v_pool : [N, D]  (or [N, 1, D]), one row per (token, head)
    seg_indptr     : int32/int64 [S + 1], segment s owns seg_indices[seg_indptr[s]:seg_indptr[s+1]]
    seg_indices    : int32/int64 [nnz], rows of k_pool / v_pool
    q              : [S, G, D], the G query heads of segment s's GQA group (one decode token)

Work balance: every segment is cut into chunks of ``chunk_size`` tokens; one Triton program per
chunk (so a 8192-token head is 16 programs, not one slow one) writes its partial output and
log-sum-exp; a second Triton kernel, one program per segment, merges the partials (fused: no
torch-level merge). Plan-free: the chunk table is two torch ops on the device (no host sync, no
per-layer host planning); the grid is the static bound ``nnz // chunk_size + S``, so a CUDA graph can
capture the call for fixed buffer sizes. Programs beyond the real chunk count exit at once.
Zero-length segments (a Fair-Copying replica's non-owned requests) produce zeros.
"""

from __future__ import annotations

import math
import os

import torch

#: Triton decides at decoration (import) time whether kernels are interpreted; so do we.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a declared dependency
    HAS_TRITON = False


def ragged_decode_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            seg_indptr: torch.Tensor, seg_indices: torch.Tensor,
                            sm_scale: float) -> torch.Tensor:
    """float32 torch reference (and the CPU path). Shapes as in the module docstring.

    Returns ``out`` [S, G, D] in ``q.dtype``; zero-length segments give zeros.
    """
    S, G, D = q.shape
    k2 = k_pool.reshape(k_pool.shape[0], -1)
    v2 = v_pool.reshape(v_pool.shape[0], -1)
    out = torch.zeros(S, G, D, dtype=torch.float32, device=q.device)
    lens = (seg_indptr[1:] - seg_indptr[:-1]).tolist()
    starts = seg_indptr[:-1].tolist()
    for s in range(S):
        if lens[s] == 0:
            continue
        idx = seg_indices[starts[s]: starts[s] + lens[s]].long()
        k = k2[idx].float()  # [L, D]
        v = v2[idx].float()
        scores = (q[s].float() @ k.T) * sm_scale  # [G, L]
        out[s] = torch.softmax(scores, dim=-1) @ v
    return out.to(q.dtype)


def chunk_indptr_for(seg_indptr: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Chunk table on the device: int32 [S + 1], segment s owns chunks [c[s], c[s+1])."""
    lens = seg_indptr[1:] - seg_indptr[:-1]
    counts = torch.div(lens + (chunk_size - 1), chunk_size, rounding_mode="floor")
    out = torch.zeros(seg_indptr.numel(), dtype=torch.int32, device=seg_indptr.device)
    out[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return out


if HAS_TRITON:

    @triton.jit
    def _chunk_attn_kernel(Q, K, V, SegIndptr, SegIndices, ChunkIndptr, OPart, LsePart,
                           sm_scale, num_segs,
                           stride_qs, stride_qg, stride_kn, stride_vn,
                           G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                           BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                           SEARCH_STEPS: tl.constexpr, DOT_F32: tl.constexpr):
        pid = tl.program_id(0)
        total = tl.load(ChunkIndptr + num_segs)
        if pid < total:
            # segment of this chunk: largest s with ChunkIndptr[s] <= pid (binary search on device)
            lo = pid * 0
            hi = lo + num_segs
            for _ in range(SEARCH_STEPS):
                mid = (lo + hi) // 2
                go = tl.load(ChunkIndptr + mid) <= pid
                lo = tl.where(go, mid, lo)
                hi = tl.where(go, hi, mid)
            seg = lo
            first = tl.load(ChunkIndptr + seg)
            seg_start = tl.load(SegIndptr + seg)
            seg_end = tl.load(SegIndptr + seg + 1)
            start = seg_start + (pid - first) * CHUNK

            offs_g = tl.arange(0, BLOCK_G)
            offs_d = tl.arange(0, BLOCK_D)
            mask_g = offs_g < G
            mask_d = offs_d < D
            q = tl.load(Q + seg * stride_qs + offs_g[:, None] * stride_qg + offs_d[None, :],
                        mask=mask_g[:, None] & mask_d[None, :], other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            for n0 in range(0, CHUNK, BLOCK_N):
                offs_n = start + n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < seg_end
                rows = tl.load(SegIndices + offs_n, mask=mask_n, other=0).to(tl.int64)
                kv_mask = mask_n[:, None] & mask_d[None, :]
                k = tl.load(K + rows[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(V + rows[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
                if DOT_F32:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * sm_scale  # [BLOCK_G, BLOCK_N]
                s = tl.where(mask_n[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                l = l * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
                m = m_new
            po = OPart + pid * BLOCK_G * BLOCK_D + offs_g[:, None] * BLOCK_D + offs_d[None, :]
            tl.store(po, acc / l[:, None])
            tl.store(LsePart + pid * BLOCK_G + offs_g, m + tl.log(l))

    @triton.jit
    def _merge_kernel(OPart, LsePart, ChunkIndptr, Out, stride_os, stride_og,
                      G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        seg = tl.program_id(0)
        c0 = tl.load(ChunkIndptr + seg)
        c1 = tl.load(ChunkIndptr + seg + 1)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for c in range(c0, c1):
            lse = tl.load(LsePart + c * BLOCK_G + offs_g)
            o = tl.load(OPart + c * BLOCK_G * BLOCK_D + offs_g[:, None] * BLOCK_D + offs_d[None, :])
            m_new = tl.maximum(m, lse)
            alpha = tl.exp(m - m_new)
            beta = tl.exp(lse - m_new)
            acc = acc * alpha[:, None] + o * beta[:, None]
            l = l * alpha + beta
            m = m_new
        res = tl.where(l[:, None] > 0, acc / tl.where(l > 0, l, 1.0)[:, None], 0.0)
        mask = (offs_g[:, None] < G) & (offs_d[None, :] < D)
        tl.store(Out + seg * stride_os + offs_g[:, None] * stride_og + offs_d[None, :],
                 res.to(Out.dtype.element_ty), mask=mask)


def _check(q, k_pool, v_pool, seg_indptr, seg_indices, chunk_size, block_n):
    if q.dim() != 3:
        raise ValueError(f"q must be [S, G, D], got shape {tuple(q.shape)}")
    S, G, D = q.shape
    if seg_indptr.dim() != 1 or seg_indptr.numel() != S + 1:
        raise ValueError(f"seg_indptr must be [S + 1] = [{S + 1}], got {tuple(seg_indptr.shape)}")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.shape[-1] != D or t.reshape(t.shape[0], -1).shape[1] != D:
            raise ValueError(f"{name} must be [N, {D}] or [N, 1, {D}], got {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in the last dimension")
    if chunk_size % block_n or chunk_size < block_n:
        raise ValueError(f"chunk_size={chunk_size} must be a positive multiple of block_n={block_n}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, k_pool {k_pool.dtype}, v_pool {v_pool.dtype}")


def ragged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  seg_indptr: torch.Tensor, seg_indices: torch.Tensor, sm_scale: float,
                  out: torch.Tensor | None = None, chunk_size: int = 512, block_n: int = 64,
                  max_chunks: int | None = None) -> torch.Tensor:
    """Decode attention of ``q`` [S, G, D] over ragged segments; returns ``out`` [S, G, D].

    Parameters
    ----------
    q : fp16/bf16/fp32 [S, G, D], contiguous in D; G query heads (one GQA group) per segment.
    k_pool, v_pool : same dtype, [N, D] or [N, 1, D], rows addressed by ``seg_indices``.
    seg_indptr : int32/int64 [S + 1] on q's device, non-decreasing, seg_indptr[0] == 0.
    seg_indices : int32/int64 [>= seg_indptr[-1]] rows of the pools.
    sm_scale : softmax scale (usually D ** -0.5).
    out : optional [S, G, D] output buffer (every row is written, zero-length segments with 0).
    chunk_size : tokens per work item (a multiple of ``block_n``).
    max_chunks : static grid size; default ``seg_indices.numel() // chunk_size + S``, an upper
        bound on the real chunk count that needs no host sync.

    Accumulates in float32. Uses the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``);
    without them falls back to :func:`ragged_decode_reference`.
    """
    _check(q, k_pool, v_pool, seg_indptr, seg_indices, chunk_size, block_n)
    S, G, D = q.shape
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape:
        raise ValueError(f"out must have shape {tuple(q.shape)}, got {tuple(out.shape)}")
    use_triton = HAS_TRITON and (q.is_cuda or _interpreting())
    if not use_triton:
        out.copy_(ragged_decode_reference(q, k_pool, v_pool, seg_indptr, seg_indices, sm_scale))
        return out
    if S == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_g = max(16, triton.next_power_of_2(G))
    block_d = max(16, triton.next_power_of_2(D))
    chunks = chunk_indptr_for(seg_indptr, chunk_size)
    grid_chunks = max_chunks if max_chunks is not None else seg_indices.numel() // chunk_size + S
    grid_chunks = max(grid_chunks, 1)
    o_part = torch.empty(grid_chunks, block_g, block_d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(grid_chunks, block_g, dtype=torch.float32, device=q.device)
    k2 = k_pool.reshape(k_pool.shape[0], D)
    v2 = v_pool.reshape(v_pool.shape[0], D)
    _chunk_attn_kernel[(grid_chunks,)](
        q, k2, v2, seg_indptr, seg_indices, chunks, o_part, lse_part, float(sm_scale), S,
        q.stride(0), q.stride(1), k2.stride(0), v2.stride(0),
        G=G, BLOCK_G=block_g, D=D, BLOCK_D=block_d, CHUNK=chunk_size, BLOCK_N=block_n,
        SEARCH_STEPS=max(1, math.ceil(math.log2(S + 1))),
        # Triton's CPU interpreter computes tl.dot on bfloat16 inputs wrongly (checked with 3.9.0):
        # upcast there only; on CUDA the dots run on the native 16-bit inputs (tensor cores).
        DOT_F32=_interpreting() and q.dtype == torch.bfloat16)
    _merge_kernel[(S,)](o_part, lse_part, chunks, out, out.stride(0), out.stride(1),
                        G=G, BLOCK_G=block_g, D=D, BLOCK_D=block_d)
    return out


def _interpreting() -> bool:
    return _INTERPRET
