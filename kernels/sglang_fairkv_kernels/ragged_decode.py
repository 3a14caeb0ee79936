"""Split-KV decode attention that reads the ragged pool's page table; its work follows the tokens.

Layout (the ``fairkv`` KV pool, :class:`sglang_fairkv.kv.ragged_pool.RaggedKVPool`): one *segment*
per (request, layer, KV head), stored in pages of ``P`` rows::

    k_rows, v_rows : [N, D]                      one row = one token of one KV head of one layer
    seg_pages      : int32 [R, L, H, MP]          pages of each segment, in order
    seg_len        : int32 [R, L, H]              tokens in each segment
    row of token t of segment (r, l, h) = seg_pages[r, l, h, t // P] * P + t % P

A decode step of layer ``layer`` attends, for batch slot ``b`` (``req_idx[b]`` = its ``req_pool_idx``)
and local KV head ``h < Hl``, the G query heads ``q[b, h]`` over segment ``(req_idx[b], layer, h)``.
The kernels read that segment's page-table row in place (a pointer, no copy of ``[B, L, H, MP]``)
and build no per-token row list.

Work split (the design of SGLang's Triton decode, ``decode_attention.py``: ``num_kv_splits`` per
request, a dynamic loop per split, a second stage that merges by log-sum-exp):

* Grid ``(B, Hl, S)``: ``S = ws.splits_for(B)`` is a static maximum per batch size, chosen so the grid
  has about ``ws.target_programs`` programs (a few per SM): batch 1 spreads each head over up to
  ``max_splits`` programs, a batch of hundreds gets ``S = 1`` (no idle programs).
* Each segment's own split count is computed in the kernel from its length (no host value, no
  table): ``n = min(ceil(len / min_split), S)``, splits of ``ceil(len / n)`` tokens rounded up to
  ``BLOCK_N``. A program past its segment's splits exits at once; the others loop over their own
  token range (a dynamic loop: ``ceil(split / BLOCK_N)`` iterations, never a pool-sized trip count).
* A fused merge kernel, one program per (slot, local head), combines the splits.

Work is therefore ``sum over segments of ceil(len / BLOCK_N)`` iterations plus ``B x Hl x S`` program
starts; nothing depends on the pool size (the workspace does not know it). Zero-length segments
(a Fair-Copying replica's requests served elsewhere, heads a rank does not hold in a layer, padding
slots) produce zeros. Static bounds: the same compiled kernels serve every step; a CUDA graph
captures one launch configuration per batch size.
"""

from __future__ import annotations

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

#: programs one decode launch aims at when the device is not known: 4 per SM of an H200 (132 SMs)
DEFAULT_TARGET_PROGRAMS = 4 * 132


def target_programs_for(device: torch.device | str) -> int:
    """About four programs per streaming multiprocessor of ``device`` (CUDA), else the H200 default."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return 4 * torch.cuda.get_device_properties(dev).multi_processor_count
    return DEFAULT_TARGET_PROGRAMS


# ---- static workspace -----------------------------------------------------------------------------
@dataclass
class DecodeWorkspace:
    """Static launch bounds and scratch of :func:`paged_decode`, allocated once per server.

    ``max_batch``: the most slots of one step; ``num_heads``: the pool's KV heads per layer ``H`` (the
    partials' stride); ``o_part`` float32 ``[rows, BG, BD]`` and ``lse_part`` ``[rows, BG]`` with
    ``rows = max over B <= max_batch of B x H x splits_for(B)`` (below ``max(max_batch x H,
    2 x target_programs)``). Nothing here depends on the pool's size.
    """

    max_batch: int
    num_heads: int
    target_programs: int
    max_splits: int
    min_split: int
    block_n: int
    block_g: int
    block_d: int
    o_part: torch.Tensor
    lse_part: torch.Tensor

    @staticmethod
    def _splits(batch: int, heads: int, target_programs: int, max_splits: int) -> int:
        return max(1, min(max_splits, -(-target_programs // max(1, batch * heads))))

    def splits_for(self, batch: int) -> int:
        """The grid's third axis for a step of ``batch`` slots (host arithmetic on static sizes)."""
        return self._splits(batch, self.num_heads, self.target_programs, self.max_splits)

    @classmethod
    def _rows(cls, max_batch: int, num_heads: int, target_programs: int, max_splits: int) -> int:
        return max(b * num_heads * cls._splits(b, num_heads, target_programs, max_splits)
                   for b in range(1, max(1, max_batch) + 1))

    @classmethod
    def _layout(cls, *, max_batch: int, num_heads: int, group: int, head_dim: int, target_programs: int,
                max_splits: int, min_split: int, block_n: int) -> tuple[int, int, int]:
        """``(scratch rows, block_g, block_d)`` of these static sizes; ValueError on bad block sizes."""
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"block_n={block_n} must be a power of two >= 16")
        if min_split < block_n or min_split % block_n:
            raise ValueError(f"min_split={min_split} must be a positive multiple of block_n={block_n}")
        if max_splits < 1:
            raise ValueError(f"max_splits={max_splits} must be >= 1")
        return (cls._rows(max_batch, num_heads, target_programs, max_splits),
                max(16, _next_pow2(group)), max(16, _next_pow2(head_dim)))

    @classmethod
    def create(cls, *, max_batch: int, num_heads: int, group: int, head_dim: int,
               device: torch.device | str, target_programs: int = DEFAULT_TARGET_PROGRAMS,
               max_splits: int = 64, min_split: int = 256, block_n: int = 64) -> "DecodeWorkspace":
        """Bounds from static sizes (``max_batch`` slots x ``num_heads`` pool heads; ``group`` query
        heads per KV head; ``head_dim``); the scratch allocated once."""
        rows, bg, bd = cls._layout(max_batch=max_batch, num_heads=num_heads, group=group, head_dim=head_dim,
                                   target_programs=target_programs, max_splits=max_splits,
                                   min_split=min_split, block_n=block_n)
        dev = torch.device(device)
        return cls(max_batch=max_batch, num_heads=num_heads, target_programs=target_programs,
                   max_splits=max_splits, min_split=min_split, block_n=block_n, block_g=bg, block_d=bd,
                   o_part=torch.empty(rows, bg, bd, dtype=torch.float32, device=dev),
                   lse_part=torch.empty(rows, bg, dtype=torch.float32, device=dev))

    @property
    def nbytes(self) -> int:
        return self.o_part.numel() * 4 + self.lse_part.numel() * 4

    @classmethod
    def bytes_for(cls, *, max_batch: int, num_heads: int, group: int, head_dim: int,
                  target_programs: int = DEFAULT_TARGET_PROGRAMS, max_splits: int = 64,
                  min_split: int = 256, block_n: int = 64) -> int:
        """Scratch bytes :meth:`create` would allocate (for budgeting before the pool exists)."""
        rows, bg, bd = cls._layout(max_batch=max_batch, num_heads=num_heads, group=group, head_dim=head_dim,
                                   target_programs=target_programs, max_splits=max_splits,
                                   min_split=min_split, block_n=block_n)
        return rows * bg * (bd + 1) * 4


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ---- Triton kernels -------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _split_range(seg_len, s, max_splits, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
        """Split ``s`` of a segment of ``seg_len`` tokens: ``(start, end, splits)`` (splits = 0 when
        the segment is empty). The same arithmetic in both kernels."""
        n = tl.minimum((seg_len + MIN_SPLIT - 1) // MIN_SPLIT, max_splits)
        n = tl.maximum(n, 1)
        per = (((seg_len + n - 1) // n + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        per = tl.maximum(per, BLOCK_N)
        splits = (seg_len + per - 1) // per
        start = s * per
        end = tl.minimum(start + per, seg_len)
        return start, end, splits

    @triton.jit
    def _paged_split_kernel(Q, K, V, SegPages, SegLen, ReqIdx, OPart, LsePart, Work,
                            sm_scale, layer, num_layers, pool_heads, max_pages, max_splits,
                            stride_qb, stride_qh, stride_qg, stride_kn, stride_vn,
                            G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                            BLOCK_D: tl.constexpr, P: tl.constexpr, MIN_SPLIT: tl.constexpr,
                            BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, COUNT_WORK: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        heads_here = tl.num_programs(1)
        r = tl.load(ReqIdx + b).to(tl.int64)
        base = (r * num_layers + layer) * pool_heads + h
        seg_len = tl.load(SegLen + base)
        start, end, splits = _split_range(seg_len, s, max_splits, MIN_SPLIT, BLOCK_N)
        part = ((b * heads_here + h) * max_splits + s).to(tl.int64)
        iters = s * 0  # an int32 tensor (a loop-carried counter must not start as a constexpr)
        if s < splits:
            table = SegPages + base * max_pages
            offs_g = tl.arange(0, BLOCK_G)
            offs_d = tl.arange(0, BLOCK_D)
            mask_g = offs_g < G
            mask_d = offs_d < D
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
                        mask=mask_g[:, None] & mask_d[None, :], other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            for n0 in range(start, end, BLOCK_N):  # dynamic trip count: this split's own tokens
                t = n0 + tl.arange(0, BLOCK_N)
                mask_n = t < end
                page = tl.load(table + t // P, mask=mask_n, other=0).to(tl.int64)
                rows = page * P + t % P
                kv_mask = mask_n[:, None] & mask_d[None, :]
                k = tl.load(K + rows[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(V + rows[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
                if DOT_F32:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                sc = tl.dot(q, tl.trans(k)).to(tl.float32) * sm_scale  # [BLOCK_G, BLOCK_N]
                sc = tl.where(mask_n[None, :], sc, float("-inf"))
                m_new = tl.maximum(m, tl.max(sc, 1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(sc - m_new[:, None])
                l = l * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
                m = m_new
                if COUNT_WORK:
                    iters += 1
            po = OPart + part * BLOCK_G * BLOCK_D + offs_g[:, None] * BLOCK_D + offs_d[None, :]
            tl.store(po, acc / l[:, None])
            tl.store(LsePart + part * BLOCK_G + offs_g, m + tl.log(l))
        if COUNT_WORK:
            tl.store(Work + part, iters)

    @triton.jit
    def _paged_merge_kernel(OPart, LsePart, SegLen, ReqIdx, Out, layer, num_layers, pool_heads,
                            max_splits, stride_ob, stride_oh, stride_og,
                            G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                            BLOCK_D: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        heads_here = tl.num_programs(1)
        r = tl.load(ReqIdx + b).to(tl.int64)
        seg_len = tl.load(SegLen + (r * num_layers + layer) * pool_heads + h)
        _, _, splits = _split_range(seg_len, 0, max_splits, MIN_SPLIT, BLOCK_N)
        first = ((b * heads_here + h) * max_splits).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for s in range(0, splits):
            c = first + s
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


def _check(q, k_rows, v_rows, seg_pages, seg_len, req_idx, ws: DecodeWorkspace):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hl, G, D], got shape {tuple(q.shape)}")
    B, Hl, G, D = q.shape
    if seg_pages.dim() != 4 or seg_len.shape != seg_pages.shape[:3]:
        raise ValueError(f"seg_pages must be [R, L, H, MP] and seg_len [R, L, H], got "
                         f"{tuple(seg_pages.shape)} and {tuple(seg_len.shape)}")
    H = seg_pages.shape[2]
    if Hl > H:
        raise ValueError(f"q has {Hl} KV heads, the page table {H}")
    if H != ws.num_heads:
        raise ValueError(f"the page table has {H} heads, the workspace was sized for {ws.num_heads}")
    if req_idx.shape != (B,):
        raise ValueError(f"req_idx must be [B] = [{B}], got {tuple(req_idx.shape)}")
    if B > ws.max_batch:
        raise ValueError(f"{B} slots exceed the workspace's {ws.max_batch}")
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
                 seg_len: torch.Tensor, req_idx: torch.Tensor, layer: int, sm_scale: float,
                 ws: DecodeWorkspace, page_size: int, out: torch.Tensor | None = None,
                 work: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of one layer over the pool's page table; returns ``out`` [B, Hl, G, D].

    Parameters
    ----------
    q : fp16/bf16/fp32 [B, Hl, G, D] (strided in B and Hl is fine; contiguous in D).
    k_rows, v_rows : same dtype, [N, D].
    seg_pages, seg_len : the pool's tables (int32 ``[R, L, H, MP]``, int32 ``[R, L, H]``), on q's device.
    req_idx : int ``[B]`` ``req_pool_idx`` of each batch slot (padding slots: any request whose
        segments in ``layer`` are empty, e.g. SGLang's padding slot 0).
    ws : the static bounds and scratch (:class:`DecodeWorkspace`).
    work : optional int32 ``[B * Hl * ws.splits_for(B)]``; when given, each program writes the loop
        iterations it ran there (the work proxy of the tests; a separate compiled variant).

    No host sync, no allocation but ``out`` (when not given); grid ``(B, Hl, ws.splits_for(B))``, then
    ``(B, Hl)`` for the merge. Accumulates in float32. Runs on CUDA or under ``TRITON_INTERPRET=1``.
    """
    _check(q, k_rows, v_rows, seg_pages, seg_len, req_idx, ws)
    B, Hl, G, D = q.shape
    R, L, H, MP = seg_pages.shape
    if out is None:
        out = torch.empty(B, Hl, G, D, dtype=q.dtype, device=q.device)
    if not (HAS_TRITON and (q.is_cuda or _interpreting())):
        raise RuntimeError("paged_decode needs CUDA or TRITON_INTERPRET=1 (the CPU server uses "
                           "ragged_torch.paged_decode_torch, the same contract in torch)")
    if B == 0 or Hl == 0:
        return out
    S = ws.splits_for(B)
    if work is not None and work.numel() < B * Hl * S:
        raise ValueError(f"work must hold {B * Hl * S} counters, got {work.numel()}")
    _paged_split_kernel[(B, Hl, S)](
        q, k_rows, v_rows, seg_pages, seg_len, req_idx, ws.o_part, ws.lse_part,
        work if work is not None else ws.lse_part,
        float(sm_scale), int(layer), L, H, MP, S,
        q.stride(0), q.stride(1), q.stride(2), k_rows.stride(0), v_rows.stride(0),
        G=G, BLOCK_G=ws.block_g, D=D, BLOCK_D=ws.block_d, P=page_size, MIN_SPLIT=ws.min_split,
        BLOCK_N=ws.block_n,
        # Triton's CPU interpreter computes tl.dot on bfloat16 inputs wrongly (checked with 3.9.0):
        # upcast there only; on CUDA the dots run on the native 16-bit inputs (tensor cores).
        DOT_F32=_interpreting() and q.dtype == torch.bfloat16, COUNT_WORK=work is not None)
    _paged_merge_kernel[(B, Hl)](
        ws.o_part, ws.lse_part, seg_len, req_idx, out, int(layer), L, H, S,
        out.stride(0), out.stride(1), out.stride(2),
        G=G, BLOCK_G=ws.block_g, D=D, BLOCK_D=ws.block_d, MIN_SPLIT=ws.min_split, BLOCK_N=ws.block_n)
    return out


def _interpreting() -> bool:
    return _INTERPRET
