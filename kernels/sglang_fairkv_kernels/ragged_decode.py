"""Split-KV decode attention that reads the ragged pool's page table, with static bounds.

Layout (the ``fairkv`` KV pool, :class:`sglang_fairkv.kv.ragged_pool.RaggedKVPool`): one *segment*
per (request, layer, KV head), stored in pages of ``P`` rows::

    k_rows, v_rows : [N, D]                      one row = one token of one KV head of one layer
    seg_pages      : int32 [R, L, H, MP]          pages of each segment, in order
    seg_len        : int32 [R, L, H]              tokens in each segment
    row of token t of segment (r, l, h) = seg_pages[r, l, h, t // P] * P + t % P

A decode step of layer ``layer`` attends, for batch slot ``b`` (``req_idx[b]`` = its ``req_pool_idx``)
and local KV head ``h < Hl``, the G query heads ``q[b, h]`` over segment ``(req_idx[b], layer, h)``.
The kernel reads that segment's page-table row in place (a pointer, no copy of ``[B, L, H, MP]``)
and builds no per-token row list.

Work balance: every segment is cut into chunks of ``CHUNK`` tokens; one program per chunk (an 8192-token
head is 16 programs, not one slow one) writes its partial output and log-sum-exp; a second kernel,
one program per (slot, head), merges the partials (fused; no torch-level merge). The chunk table
(``chunk_tables``: a cumsum over the step's lengths, for all layers at once) is built on the device
once per step; each program finds its segment by a binary search over it.

Static bounds (the same compiled kernels serve every step; a CUDA graph can capture the call):
:class:`DecodeWorkspace` fixes the grid (``max_chunks`` programs; those past the step's real chunk
count exit at once), the binary search depth (from ``max_segments``) and the scratch buffers. A
bound on the chunks of one layer that needs no data: ``pool rows // CHUNK + max_segments`` (a layer
cannot hold more rows than the pool); the workspace raises ``CHUNK`` when that would make the
scratch too large. Zero-length segments (a Fair-Copying replica's requests served elsewhere, heads a
rank does not hold in a layer) produce zeros.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

#: Triton decides at decoration (import) time whether kernels are interpreted; so do we.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a declared dependency
    HAS_TRITON = False


def chunk_tables(lens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Chunk tables of every layer of one step, on the device (no host sync).

    ``lens``: int ``[B, L, H]`` segment lengths of the batch. Returns int32 ``[L, B * H + 1]``: in
    layer ``l``, segment ``s = b * H + h`` owns chunks ``[c[l, s], c[l, s + 1])``.
    """
    B, L, H = lens.shape
    counts = torch.div(lens.transpose(0, 1).reshape(L, B * H) + (chunk_size - 1), chunk_size,
                       rounding_mode="floor")
    out = torch.zeros(L, B * H + 1, dtype=torch.int32, device=lens.device)
    out[:, 1:] = torch.cumsum(counts, dim=1, dtype=torch.int32)
    return out


# ---- static workspace -----------------------------------------------------------------------------
@dataclass
class DecodeWorkspace:
    """Static launch bounds and scratch of :func:`paged_decode`, allocated once per server.

    ``max_segments``: the most (slot, pool head) segments of one step (max batch x pool heads);
    ``max_chunks``: the grid; ``o_part`` float32 ``[max_chunks, BG, BD]``, ``lse_part`` ``[max_chunks, BG]``.
    """

    max_segments: int
    max_chunks: int
    chunk_size: int
    block_n: int
    block_g: int
    block_d: int
    search_steps: int
    o_part: torch.Tensor
    lse_part: torch.Tensor

    @staticmethod
    def _bounds(*, max_segments: int, pool_rows: int, group: int, head_dim: int, chunk_size: int,
                block_n: int, max_scratch_chunks: int) -> tuple[int, int, int, int]:
        """``(chunk_size, max_chunks, block_g, block_d)`` from the static sizes: ``chunk_size`` raised
        (doubled, a multiple of ``block_n``) until the grid is at most ``max_scratch_chunks +
        max_segments``."""
        if chunk_size % block_n or chunk_size < block_n:
            raise ValueError(f"chunk_size={chunk_size} must be a positive multiple of block_n={block_n}")
        while pool_rows // chunk_size > max_scratch_chunks:
            chunk_size *= 2
        return (chunk_size, max(1, pool_rows // chunk_size + max_segments),
                max(16, _next_pow2(group)), max(16, _next_pow2(head_dim)))

    @classmethod
    def create(cls, *, max_segments: int, pool_rows: int, group: int, head_dim: int,
               device: torch.device | str, chunk_size: int = 512, block_n: int = 64,
               max_scratch_chunks: int = 16384) -> "DecodeWorkspace":
        """Bounds from static sizes: ``pool_rows`` (the most rows one layer can hold) and
        ``max_segments`` (see :meth:`_bounds`); the scratch allocated once."""
        chunk, chunks, bg, bd = cls._bounds(max_segments=max_segments, pool_rows=pool_rows, group=group,
                                            head_dim=head_dim, chunk_size=chunk_size, block_n=block_n,
                                            max_scratch_chunks=max_scratch_chunks)
        dev = torch.device(device)
        return cls(max_segments=max_segments, max_chunks=chunks, chunk_size=chunk, block_n=block_n,
                   block_g=bg, block_d=bd, search_steps=max(1, math.ceil(math.log2(max_segments + 1))),
                   o_part=torch.empty(chunks, bg, bd, dtype=torch.float32, device=dev),
                   lse_part=torch.empty(chunks, bg, dtype=torch.float32, device=dev))

    @property
    def nbytes(self) -> int:
        return self.o_part.numel() * 4 + self.lse_part.numel() * 4

    @classmethod
    def bytes_for(cls, *, max_segments: int, pool_rows: int, group: int, head_dim: int,
                  chunk_size: int = 512, block_n: int = 64, max_scratch_chunks: int = 16384) -> int:
        """Scratch bytes :meth:`create` would allocate (for budgeting before the pool exists)."""
        _, chunks, bg, bd = cls._bounds(max_segments=max_segments, pool_rows=pool_rows, group=group,
                                        head_dim=head_dim, chunk_size=chunk_size, block_n=block_n,
                                        max_scratch_chunks=max_scratch_chunks)
        return chunks * bg * (bd + 1) * 4


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ---- Triton kernels -------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _paged_chunk_kernel(Q, K, V, SegPages, SegLen, ReqIdx, ChunkIndptr, OPart, LsePart,
                            sm_scale, num_segs, layer, num_layers, pool_heads, heads_here, max_pages,
                            stride_qb, stride_qh, stride_qg, stride_kn, stride_vn,
                            G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                            BLOCK_D: tl.constexpr, P: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK_N: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                            DOT_F32: tl.constexpr):
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
            b = seg // pool_heads
            h = seg % pool_heads
            r = tl.load(ReqIdx + b).to(tl.int64)
            base = (r * num_layers + layer) * pool_heads + h
            seg_len = tl.load(SegLen + base)
            table = SegPages + base * max_pages
            start = (pid - tl.load(ChunkIndptr + seg)) * CHUNK

            offs_g = tl.arange(0, BLOCK_G)
            offs_d = tl.arange(0, BLOCK_D)
            mask_g = (offs_g < G) & ((offs_g * 0 + h) < heads_here)  # heads past the layer's own: never active
            mask_d = offs_d < D
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
                        mask=mask_g[:, None] & mask_d[None, :], other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            for n0 in range(0, CHUNK, BLOCK_N):
                t = start + n0 + tl.arange(0, BLOCK_N)
                mask_n = t < seg_len
                page = tl.load(table + t // P, mask=mask_n, other=0).to(tl.int64)
                rows = page * P + t % P
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
    def _paged_merge_kernel(OPart, LsePart, ChunkIndptr, Out, pool_heads, heads_here,
                            stride_ob, stride_oh, stride_og,
                            G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)  # (slot, local head) = (pid // heads_here, pid % heads_here)
        b = pid // heads_here
        h = pid % heads_here
        seg = b * pool_heads + h
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
        tl.store(Out + b * stride_ob + h * stride_oh + offs_g[:, None] * stride_og + offs_d[None, :],
                 res.to(Out.dtype.element_ty), mask=mask)


def _check(q, k_rows, v_rows, seg_pages, seg_len, req_idx, chunk_indptr, ws: DecodeWorkspace):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hl, G, D], got shape {tuple(q.shape)}")
    B, Hl, G, D = q.shape
    if seg_pages.dim() != 4 or seg_len.shape != seg_pages.shape[:3]:
        raise ValueError(f"seg_pages must be [R, L, H, MP] and seg_len [R, L, H], got "
                         f"{tuple(seg_pages.shape)} and {tuple(seg_len.shape)}")
    H = seg_pages.shape[2]
    if Hl > H:
        raise ValueError(f"q has {Hl} KV heads, the page table {H}")
    if req_idx.shape != (B,):
        raise ValueError(f"req_idx must be [B] = [{B}], got {tuple(req_idx.shape)}")
    if chunk_indptr.shape != (B * H + 1,):
        raise ValueError(f"chunk_indptr must be [B * H + 1] = [{B * H + 1}], got {tuple(chunk_indptr.shape)}")
    if B * H > ws.max_segments:
        raise ValueError(f"{B} slots x {H} heads exceed the workspace's {ws.max_segments} segments")
    if G > ws.block_g or D > ws.block_d:
        raise ValueError(f"group {G} / head_dim {D} exceed the workspace's {ws.block_g} / {ws.block_d}")
    for name, t in (("k_rows", k_rows), ("v_rows", v_rows)):
        if t.dim() != 2 or t.shape[1] != D or t.stride(-1) != 1:
            raise ValueError(f"{name} must be [N, {D}] contiguous in D, got {tuple(t.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k_rows.dtype != q.dtype or v_rows.dtype != q.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, k_rows {k_rows.dtype}, v_rows {v_rows.dtype}")
    if seg_pages.dtype != torch.int32 or not seg_pages.is_contiguous() or not seg_len.is_contiguous():
        raise ValueError("seg_pages must be contiguous int32, seg_len contiguous")


def paged_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, seg_pages: torch.Tensor,
                 seg_len: torch.Tensor, req_idx: torch.Tensor, layer: int, chunk_indptr: torch.Tensor,
                 sm_scale: float, ws: DecodeWorkspace, page_size: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of one layer over the pool's page table; returns ``out`` [B, Hl, G, D].

    Parameters
    ----------
    q : fp16/bf16/fp32 [B, Hl, G, D] (strided in B and Hl is fine; contiguous in D).
    k_rows, v_rows : same dtype, [N, D].
    seg_pages, seg_len : the pool's tables (int32 ``[R, L, H, MP]``, int ``[R, L, H]``), on q's device.
    req_idx : int ``[B]`` ``req_pool_idx`` of each batch slot (padding slots: any request whose
        segments in ``layer`` are empty, e.g. SGLang's padding slot 0).
    chunk_indptr : int32 ``[B * H + 1]``, this layer's row of :func:`chunk_tables` (``ws.chunk_size``).
    ws : the static bounds and scratch (:class:`DecodeWorkspace`).

    No host sync, no allocation but ``out`` (when not given); grid ``ws.max_chunks``. Accumulates in
    float32. Runs the Triton kernels on CUDA or under ``TRITON_INTERPRET=1``.
    """
    _check(q, k_rows, v_rows, seg_pages, seg_len, req_idx, chunk_indptr, ws)
    B, Hl, G, D = q.shape
    R, L, H, MP = seg_pages.shape
    if out is None:
        out = torch.empty(B, Hl, G, D, dtype=q.dtype, device=q.device)
    if not (HAS_TRITON and (q.is_cuda or _interpreting())):
        raise RuntimeError("paged_decode needs CUDA or TRITON_INTERPRET=1 (the CPU server uses "
                           "ragged_torch.paged_decode_torch, the same contract in torch)")
    if B == 0 or Hl == 0:
        return out
    _paged_chunk_kernel[(ws.max_chunks,)](
        q, k_rows, v_rows, seg_pages, seg_len, req_idx, chunk_indptr, ws.o_part, ws.lse_part,
        float(sm_scale), B * H, int(layer), L, H, Hl, MP,
        q.stride(0), q.stride(1), q.stride(2), k_rows.stride(0), v_rows.stride(0),
        G=G, BLOCK_G=ws.block_g, D=D, BLOCK_D=ws.block_d, P=page_size, CHUNK=ws.chunk_size,
        BLOCK_N=ws.block_n, SEARCH_STEPS=ws.search_steps,
        # Triton's CPU interpreter computes tl.dot on bfloat16 inputs wrongly (checked with 3.9.0):
        # upcast there only; on CUDA the dots run on the native 16-bit inputs (tensor cores).
        DOT_F32=_interpreting() and q.dtype == torch.bfloat16)
    _paged_merge_kernel[(B * Hl,)](
        ws.o_part, ws.lse_part, chunk_indptr, out, H, Hl, out.stride(0), out.stride(1), out.stride(2),
        G=G, BLOCK_G=ws.block_g, D=D, BLOCK_D=ws.block_d)
    return out


def _interpreting() -> bool:
    return _INTERPRET
