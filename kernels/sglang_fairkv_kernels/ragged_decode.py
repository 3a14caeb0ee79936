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

Work split by length (the design of FlashInfer's balanced decode plan, with SGLang's split-KV kernels
and LSE merge):

* **A plan per step** (:func:`plan_decode`, one launch of ``L`` programs, before the layers run): for
  every layer, its batch's tokens ``T_l`` (sum over the ``B x H`` segments), a piece size
  ``C_l = max(min_split, ceil(T_l / N) rounded up to BLOCK_N)`` with ``N = max(target_programs, B x H)``,
  and the inclusive prefix sum over the segments of their piece counts ``ceil(len / C_l)``
  (``plan_off [L, max_batch x H]``, ``plan_chunk [L]``: the workspace's static buffers, read by a captured
  graph in place). The pieces of a layer number at most ``T_l / C_l + B x H <= N + B x H``.
* **Split kernel**, a 1-D grid of ``programs_for(B) = N + B x H`` programs (static per batch size):
  program ``p`` finds its segment by a binary search of ``plan_off[layer]`` and runs piece ``p - first``
  of it, at most ``C_l`` tokens (a dynamic loop of ``ceil(C_l / BLOCK_N)`` iterations); programs past the
  layer's pieces exit. So no program runs more than about twice the even share of the step, whatever
  the per-head skew (AdaKV's budgets: one head of 4189 tokens beside a median of 113), where a split
  count fixed per batch size ran the longest segment in one program's loop.
* A fused **merge** kernel, one program per (slot, local head), combines its segment's pieces by LSE.

Work is ``sum over pieces of ceil(piece / BLOCK_N)`` iterations plus ``programs_for(B)`` program
starts; nothing depends on the pool size. Zero-length segments (a Fair-Copying replica's requests
served elsewhere, heads a rank does not hold in a layer, padding slots) have no piece and produce zeros.
Static bounds: the same compiled kernels serve every step (integers that vary between steps or layers
are not specialised: ``do_not_specialize``); a CUDA graph captures one launch configuration per batch size.
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
    """Static launch bounds, plan and scratch of :func:`paged_decode`, allocated once per server.

    ``max_batch``: the most slots of one step; ``num_heads``: the pool's KV heads per layer ``H``;
    ``num_layers``: the plan's rows (the pool's layers). ``o_part`` float32 ``[rows, BG, BD]`` and
    ``lse_part`` ``[rows, BG]`` hold one partial result per program, ``rows = programs_for(max_batch)``;
    ``plan_chunk`` int32 ``[L]`` and ``plan_off`` int32 ``[L, max_batch x H]`` the step's plan
    (:func:`plan_decode`). Nothing here depends on the pool's size.
    """

    max_batch: int
    num_heads: int
    num_layers: int
    target_programs: int
    min_split: int
    block_n: int
    block_g: int
    block_d: int
    o_part: torch.Tensor
    lse_part: torch.Tensor
    plan_chunk: torch.Tensor
    plan_off: torch.Tensor
    #: the batch size of the last :func:`plan_decode` of all layers (host bookkeeping; None: not planned)
    planned_batch: int | None = None

    @staticmethod
    def _even(batch: int, heads: int, target_programs: int) -> int:
        return max(target_programs, batch * heads)

    def even_programs(self, batch: int) -> int:
        """``N``: the programs a layer's tokens are shared over (each piece at most ``ceil(T / N)``)."""
        return self._even(batch, self.num_heads, self.target_programs)

    def programs_for(self, batch: int) -> int:
        """The split kernel's grid for a step of ``batch`` slots: ``N + batch x H`` (static per size)."""
        return self.even_programs(batch) + batch * self.num_heads

    @classmethod
    def _layout(cls, *, max_batch: int, num_heads: int, group: int, head_dim: int, target_programs: int,
                min_split: int, block_n: int) -> tuple[int, int, int]:
        """``(scratch rows, block_g, block_d)`` of these static sizes; ValueError on bad block sizes."""
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"block_n={block_n} must be a power of two >= 16")
        if min_split < block_n or min_split % block_n:
            raise ValueError(f"min_split={min_split} must be a positive multiple of block_n={block_n}")
        if target_programs < 1:
            raise ValueError(f"target_programs={target_programs} must be >= 1")
        rows = cls._even(max_batch, num_heads, target_programs) + max(1, max_batch) * num_heads
        return rows, max(16, _next_pow2(group)), max(16, _next_pow2(head_dim))

    @classmethod
    def create(cls, *, max_batch: int, num_heads: int, group: int, head_dim: int,
               device: torch.device | str, num_layers: int = 1, target_programs: int = DEFAULT_TARGET_PROGRAMS,
               min_split: int = 64, block_n: int = 64) -> "DecodeWorkspace":
        """Bounds from static sizes (``max_batch`` slots x ``num_heads`` pool heads, ``num_layers``;
        ``group`` query heads per KV head; ``head_dim``); the scratch and the plan allocated once."""
        rows, bg, bd = cls._layout(max_batch=max_batch, num_heads=num_heads, group=group, head_dim=head_dim,
                                   target_programs=target_programs, min_split=min_split, block_n=block_n)
        dev = torch.device(device)
        return cls(max_batch=max_batch, num_heads=num_heads, num_layers=num_layers, target_programs=target_programs,
                   min_split=min_split, block_n=block_n, block_g=bg, block_d=bd,
                   o_part=torch.empty(rows, bg, bd, dtype=torch.float32, device=dev),
                   lse_part=torch.empty(rows, bg, dtype=torch.float32, device=dev),
                   plan_chunk=torch.zeros(num_layers, dtype=torch.int32, device=dev),
                   plan_off=torch.zeros(num_layers, max(1, max_batch) * num_heads, dtype=torch.int32, device=dev))

    @property
    def nbytes(self) -> int:
        return (self.o_part.numel() + self.lse_part.numel() + self.plan_chunk.numel() + self.plan_off.numel()) * 4

    @classmethod
    def bytes_for(cls, *, max_batch: int, num_heads: int, group: int, head_dim: int, num_layers: int = 1,
                  target_programs: int = DEFAULT_TARGET_PROGRAMS, min_split: int = 64, block_n: int = 64) -> int:
        """Bytes :meth:`create` would allocate (for budgeting before the pool exists)."""
        rows, bg, bd = cls._layout(max_batch=max_batch, num_heads=num_heads, group=group, head_dim=head_dim,
                                   target_programs=target_programs, min_split=min_split, block_n=block_n)
        return (rows * bg * (bd + 1) + num_layers * (1 + max(1, max_batch) * num_heads)) * 4


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


#: the fp8 row dtypes the kernel reads (SGLang's ``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

#: integer arguments that vary between steps or layers: never specialised (Triton would compile a
#: variant per class {== 1, divisible by 16, other} of each, mid-serving, stalling every TP rank)
PLAN_DYNAMIC = ("layer0", "n_seg", "even")
SPLIT_DYNAMIC = ("layer", "n_seg", "heads_here", "stride_qb", "stride_qh")
MERGE_DYNAMIC = ("layer", "stride_ob", "stride_oh")


# ---- Triton kernels -------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit(do_not_specialize=PLAN_DYNAMIC)
    def _plan_kernel(SegLen, ReqIdx, PlanChunk, PlanOff, layer0, n_seg, even, num_layers, pool_heads,
                     off_stride, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
        """Layer ``layer0 + program_id``: its batch's tokens, piece size, and the prefix sum of its
        segments' piece counts (segment ``j`` = slot ``j // H``, head ``j % H``)."""
        l = layer0 + tl.program_id(0)
        total = n_seg * 0  # an int32 tensor (a loop-carried value must not start as a constexpr)
        for j0 in range(0, n_seg, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            m = j < n_seg
            r = tl.load(ReqIdx + j // pool_heads, mask=m, other=0).to(tl.int64)
            n = tl.load(SegLen + (r * num_layers + l) * pool_heads + j % pool_heads, mask=m, other=0)
            total += tl.sum(n, 0)
        chunk = (((total + even - 1) // even + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        chunk = tl.maximum(chunk, MIN_SPLIT)
        tl.store(PlanChunk + l, chunk)
        carry = n_seg * 0
        for j0 in range(0, n_seg, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            m = j < n_seg
            r = tl.load(ReqIdx + j // pool_heads, mask=m, other=0).to(tl.int64)
            n = tl.load(SegLen + (r * num_layers + l) * pool_heads + j % pool_heads, mask=m, other=0)
            pieces = tl.where(m, (n + chunk - 1) // chunk, 0)
            tl.store(PlanOff + l * off_stride + j, tl.cumsum(pieces, 0) + carry, mask=m)
            carry += tl.sum(pieces, 0)

    @triton.jit(do_not_specialize=SPLIT_DYNAMIC)
    def _paged_split_kernel(Q, K, V, SegPages, SegLen, ReqIdx, PlanChunk, PlanOff, OPart, LsePart, Work,
                            sm_scale, v_scale, layer, n_seg, heads_here, num_layers, pool_heads, max_pages,
                            off_stride, stride_qb, stride_qh, stride_qg, stride_kn, stride_vn,
                            G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                            BLOCK_D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, LOG2_SEG: tl.constexpr,
                            DOT_F32: tl.constexpr, COUNT_WORK: tl.constexpr, KV_FP8: tl.constexpr):
        p = tl.program_id(0)
        off_row = PlanOff + layer * off_stride
        total = tl.load(off_row + n_seg - 1)
        iters = p * 0  # an int32 tensor (a loop-carried counter must not start as a constexpr)
        if p < total:
            # the segment of piece p: the first j with plan_off[j] > p (a binary search, static trip count)
            lo = p * 0
            hi = lo + n_seg - 1
            for _ in range(LOG2_SEG):
                mid = (lo + hi) // 2
                right = tl.load(off_row + mid) <= p
                lo = tl.where(right, mid + 1, lo)
                hi = tl.where(right, hi, mid)
            j = lo
            first = tl.load(off_row + tl.maximum(j - 1, 0))
            first = tl.where(j > 0, first, 0)
            b = j // pool_heads
            h = j % pool_heads
            if h < heads_here:
                r = tl.load(ReqIdx + b).to(tl.int64)
                base = (r * num_layers + layer) * pool_heads + h
                seg_len = tl.load(SegLen + base)
                chunk = tl.load(PlanChunk + layer)
                start = (p - first) * chunk
                end = tl.minimum(start + chunk, seg_len)
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
                for n0 in range(start, end, BLOCK_N):  # dynamic trip count: this piece's own tokens
                    t = n0 + tl.arange(0, BLOCK_N)
                    mask_n = t < end
                    page = tl.load(table + t // P, mask=mask_n, other=0).to(tl.int64)
                    rows = page * P + t % P
                    kv_mask = mask_n[:, None] & mask_d[None, :]
                    k = tl.load(K + rows[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
                    v = tl.load(V + rows[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
                    if KV_FP8:  # exact widening in registers; k_scale is in sm_scale, v_scale applied below
                        k = k.to(q.dtype)
                        v = v.to(q.dtype)
                    if DOT_F32:
                        k = k.to(tl.float32)
                        v = v.to(tl.float32)
                    sc = tl.dot(q, tl.trans(k)).to(tl.float32) * sm_scale  # [BLOCK_G, BLOCK_N]
                    sc = tl.where(mask_n[None, :], sc, float("-inf"))
                    m_new = tl.maximum(m, tl.max(sc, 1))
                    alpha = tl.exp(m - m_new)
                    pr = tl.exp(sc - m_new[:, None])
                    l = l * alpha + tl.sum(pr, 1)
                    acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v).to(tl.float32)
                    m = m_new
                    if COUNT_WORK:
                        iters += 1
                part = p.to(tl.int64)
                po = OPart + part * BLOCK_G * BLOCK_D + offs_g[:, None] * BLOCK_D + offs_d[None, :]
                tl.store(po, acc * (v_scale / l)[:, None])
                tl.store(LsePart + part * BLOCK_G + offs_g, m + tl.log(l))
        if COUNT_WORK:
            tl.store(Work + p, iters)

    @triton.jit(do_not_specialize=MERGE_DYNAMIC)
    def _paged_merge_kernel(OPart, LsePart, PlanOff, Out, layer, pool_heads, off_stride,
                            stride_ob, stride_oh, stride_og,
                            G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        j = b * pool_heads + h
        off_row = PlanOff + layer * off_stride
        last = tl.load(off_row + j)
        first = tl.load(off_row + tl.maximum(j - 1, 0))
        first = tl.where(j > 0, first, 0)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for c in range(first, last):
            c64 = first.to(tl.int64) * 0 + c  # int64 (in the interpreter c is a host int)
            lse = tl.load(LsePart + c64 * BLOCK_G + offs_g)
            o = tl.load(OPart + c64 * BLOCK_G * BLOCK_D + offs_g[:, None] * BLOCK_D + offs_d[None, :])
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


def plan_decode(seg_len: torch.Tensor, req_idx: torch.Tensor, ws: DecodeWorkspace,
                layer: int | None = None) -> None:
    """The step's work plan into ``ws.plan_chunk`` / ``ws.plan_off`` (one launch; no host sync): every
    layer of the tables (``layer=None``: once per step, before the layers run), or one layer.
    ``seg_len`` int32 ``[R, L, H]`` (lengths after the step's append), ``req_idx`` int ``[B]``."""
    B = req_idx.shape[0]
    R, L, H = seg_len.shape
    if L > ws.num_layers:
        raise ValueError(f"the tables have {L} layers, the workspace's plan {ws.num_layers}")
    if H != ws.num_heads or B > ws.max_batch:
        raise ValueError(f"plan of {B} slots x {H} heads for a workspace of {ws.max_batch} x {ws.num_heads}")
    if not (HAS_TRITON and (seg_len.is_cuda or _interpreting())):
        raise RuntimeError("plan_decode needs CUDA or TRITON_INTERPRET=1")
    if B == 0:
        return
    n_seg = B * H
    layer0, n_layers = (0, L) if layer is None else (int(layer), 1)
    _plan_kernel[(n_layers,)](seg_len, req_idx, ws.plan_chunk, ws.plan_off, layer0, n_seg, ws.even_programs(B),
                              L, H, ws.plan_off.stride(0), MIN_SPLIT=ws.min_split, BLOCK_N=ws.block_n,
                              BLOCK=min(1024, max(16, _next_pow2(ws.max_batch * H))))  # static: one variant
    if layer is None:
        ws.planned_batch = B


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
    if seg_pages.shape[1] > ws.num_layers:
        raise ValueError(f"the tables have {seg_pages.shape[1]} layers, the workspace's plan {ws.num_layers}")
    if B > ws.max_batch:
        raise ValueError(f"{B} slots exceed the workspace's {ws.max_batch}")
    if G > ws.block_g or D > ws.block_d:
        raise ValueError(f"group {G} / head_dim {D} exceed the workspace's {ws.block_g} / {ws.block_d}")
    for name, t in (("k_rows", k_rows), ("v_rows", v_rows)):
        if t.dim() != 2 or t.shape[1] != D or t.stride(-1) != 1:
            raise ValueError(f"{name} must be [N, {D}] contiguous in D, got {tuple(t.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k_rows.dtype != v_rows.dtype or k_rows.dtype not in (q.dtype, *FP8_DTYPES):
        raise ValueError(f"k_rows / v_rows must both be q's dtype or both fp8 (e4m3fn, e5m2): q {q.dtype}, "
                         f"k_rows {k_rows.dtype}, v_rows {v_rows.dtype}")
    if seg_pages.dtype != torch.int32 or not seg_pages.is_contiguous() or not seg_len.is_contiguous():
        raise ValueError("seg_pages must be contiguous int32, seg_len contiguous")


def paged_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, seg_pages: torch.Tensor,
                 seg_len: torch.Tensor, req_idx: torch.Tensor, layer: int, sm_scale: float,
                 ws: DecodeWorkspace, page_size: int, out: torch.Tensor | None = None,
                 work: torch.Tensor | None = None, planned: bool = False, k_scale: float = 1.0,
                 v_scale: float = 1.0) -> torch.Tensor:
    """Decode attention of one layer over the pool's page table; returns ``out`` [B, Hl, G, D].

    Parameters
    ----------
    q : fp16/bf16/fp32 [B, Hl, G, D] (strided in B and Hl is fine; contiguous in D).
    k_rows, v_rows : [N, D], q's dtype, or fp8 (``float8_e4m3fn`` / ``float8_e5m2``) rows holding
        ``K / k_scale`` and ``V / v_scale``: loaded as fp8 and widened to q's dtype in registers
        (exact), ``k_scale`` folded into the softmax scale and ``v_scale`` into each piece's output
        (no dequantised copy of the pool). Host floats per layer, as SGLang's ``k_scale_float``.
    seg_pages, seg_len : the pool's tables (int32 ``[R, L, H, MP]``, int32 ``[R, L, H]``), on q's device.
    req_idx : int ``[B]`` ``req_pool_idx`` of each batch slot (padding slots: any request whose
        segments in ``layer`` are empty, e.g. SGLang's padding slot 0).
    ws : the static bounds, plan and scratch (:class:`DecodeWorkspace`).
    planned : the step's :func:`plan_decode` of every layer ran for these ``B`` slots (the server's
        decode step); else this layer is planned first (one more launch).
    work : optional int32 ``[ws.programs_for(B)]``; when given, each program writes the loop
        iterations it ran there (the work proxy of the tests; a separate compiled variant).

    No host sync, no allocation but ``out`` (when not given); grid ``(ws.programs_for(B),)``, then
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
    if planned:
        if ws.planned_batch != B:
            raise RuntimeError(f"paged_decode(planned=True) for {B} slots, the last plan was for {ws.planned_batch}")
    else:
        plan_decode(seg_len, req_idx, ws, layer=layer)
    n_prog = ws.programs_for(B)
    if work is not None and work.numel() < n_prog:
        raise ValueError(f"work must hold {n_prog} counters, got {work.numel()}")
    _paged_split_kernel[(n_prog,)](
        q, k_rows, v_rows, seg_pages, seg_len, req_idx, ws.plan_chunk, ws.plan_off, ws.o_part, ws.lse_part,
        work if work is not None else ws.lse_part,
        float(sm_scale) * float(k_scale), float(v_scale), int(layer), B * H, Hl, L, H, MP, ws.plan_off.stride(0),
        q.stride(0), q.stride(1), q.stride(2), k_rows.stride(0), v_rows.stride(0),
        G=G, BLOCK_G=ws.block_g, D=D, BLOCK_D=ws.block_d, P=page_size, BLOCK_N=ws.block_n,
        LOG2_SEG=max(1, (ws.max_batch * H).bit_length()),
        # Triton's CPU interpreter computes tl.dot on bfloat16 inputs wrongly (checked with 3.9.0):
        # upcast there only; on CUDA the dots run on the native 16-bit inputs (tensor cores).
        DOT_F32=_interpreting() and q.dtype == torch.bfloat16, COUNT_WORK=work is not None,
        KV_FP8=k_rows.dtype in FP8_DTYPES)
    _paged_merge_kernel[(B, Hl)](
        ws.o_part, ws.lse_part, ws.plan_off, out, int(layer), H, ws.plan_off.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        G=G, BLOCK_G=ws.block_g, D=D, BLOCK_D=ws.block_d)
    return out


def _interpreting() -> bool:
    return _INTERPRET
