"""The per-step device work of the ragged pool in two small Triton launches (CUDA; the interpreter on a CPU).

A decode step's host bookkeeping ends in one upload of packed ``(flat index, value)`` writes for the
pool's three tables (``seg_pages``, ``seg_len``, ``active``; see
:meth:`sglang_fairkv.kv.ragged_pool.RaggedKVPool.flush`). Then:

1. :func:`apply_table_writes` -- one launch scatters every write of the three tables (the torch version
   is an ``index_put_`` per table plus the casts and views around them).
2. :func:`decode_step` -- one launch over ``(slot, layer)``: for each KV head the new token's row
   (``seg_pages[r, l, h, len // P] * P + len % P``, or 0 -- the sink page -- for a segment not held
   here), the length advanced (``seg_len`` written back), and the step's metadata written straight into
   the caller's buffers: rows ``[L, bs, H]``, lengths ``[bs, L, H]`` and request indices ``[bs]`` (the
   CUDA-graph runner's static buffers, or fresh ones). Slots ``>= raw`` (SGLang's padding of a captured
   batch size) get row 0, length 0 and request 0: they write the sink page and attend nothing.

The torch code they replace (about 25 launches per step) stays the pool's path on the CPU; the tests run
both under ``TRITON_INTERPRET=1`` and compare every table and output.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a declared dependency
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit(do_not_specialize=("n_pages", "n_len", "n_act"))  # counts vary every step
    def _apply_writes_kernel(Packed, SegPages, SegLen, Active, n_pages, n_len, n_act,
                             BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        # packed: [pages idx (n_pages), pages val, len idx (n_len), len val, active idx, active val]
        m = offs < n_pages
        idx = tl.load(Packed + offs, mask=m, other=0)
        val = tl.load(Packed + n_pages + offs, mask=m, other=0)
        tl.store(SegPages + idx, val.to(tl.int32), mask=m)
        base = 2 * n_pages
        m = offs < n_len
        idx = tl.load(Packed + base + offs, mask=m, other=0)
        val = tl.load(Packed + base + n_len + offs, mask=m, other=0)
        tl.store(SegLen + idx, val.to(tl.int32), mask=m)
        base += 2 * n_len
        m = offs < n_act
        idx = tl.load(Packed + base + offs, mask=m, other=0)
        val = tl.load(Packed + base + n_act + offs, mask=m, other=0)
        tl.store(Active + idx, (val != 0).to(tl.int8), mask=m)

    @triton.jit(do_not_specialize=("raw", "stride_rl", "stride_rb"))  # vary with the batch size
    def _decode_step_kernel(ReqIdx, SegPages, SegLen, Active, RowsOut, LensOut, IdxOut, raw,
                            num_layers, num_heads, max_pages, stride_rl, stride_rb,
                            P: tl.constexpr, BLOCK_H: tl.constexpr):
        b = tl.program_id(0)
        l = tl.program_id(1)
        offs_h = tl.arange(0, BLOCK_H)
        mh = offs_h < num_heads
        real = b < raw
        r = tl.load(ReqIdx + tl.minimum(b, raw - 1)).to(tl.int64)  # raw >= 1 (the host guarantees it)
        r = tl.where(real, r, 0)
        seg = (r * num_layers + l) * num_heads + offs_h  # [BLOCK_H]
        mr = mh & ((offs_h * 0 + b) < raw)  # a vector mask (a scalar one is refused by the interpreter)
        n = tl.load(SegLen + seg, mask=mr, other=0)
        act = tl.load(Active + seg, mask=mr, other=0) != 0
        page = tl.load(SegPages + seg * max_pages + n // P, mask=mr & act, other=0).to(tl.int64)
        row = tl.where(act, page * P + n % P, 0)
        new = n + act.to(n.dtype)
        tl.store(SegLen + seg, new, mask=mr)
        tl.store(RowsOut + l * stride_rl + b * stride_rb + offs_h, row, mask=mh)
        tl.store(LensOut + (b * num_layers + l) * num_heads + offs_h, new, mask=mh)
        if l == 0:
            tl.store(IdxOut + b, r)


def _cuda_or_interpreted(t: torch.Tensor) -> bool:
    from .ragged_decode import _interpreting

    return HAS_TRITON and (t.is_cuda or _interpreting())


def apply_table_writes(packed: torch.Tensor, n_pages: int, n_len: int, n_act: int, seg_pages: torch.Tensor,
                       seg_len: torch.Tensor, active: torch.Tensor, block: int = 256) -> None:
    """Scatter the step's packed writes into the three tables (one launch; no host sync).

    ``packed`` int64 on the tables' device: ``[pages idx, pages val, len idx, len val, active idx,
    active val]`` with ``n_pages`` / ``n_len`` / ``n_act`` entries each (host ints); indices are flat
    into ``seg_pages`` (int32), ``seg_len`` (int32), ``active`` (bool).
    """
    n = max(n_pages, n_len, n_act)
    if n == 0:
        return
    if not _cuda_or_interpreted(packed):
        raise RuntimeError("apply_table_writes needs CUDA or TRITON_INTERPRET=1")
    if seg_pages.dtype != torch.int32 or seg_len.dtype != torch.int32 or active.dtype != torch.bool:
        raise ValueError("tables must be int32 seg_pages, int32 seg_len, bool active")
    if packed.numel() < 2 * (n_pages + n_len + n_act):
        raise ValueError(f"packed holds {packed.numel()} values, the sizes say {2 * (n_pages + n_len + n_act)}")
    _apply_writes_kernel[(triton.cdiv(n, block),)](packed, seg_pages, seg_len, active.view(torch.int8),
                                                   n_pages, n_len, n_act, BLOCK=block)


def decode_step(req_idx: torch.Tensor, seg_pages: torch.Tensor, seg_len: torch.Tensor, active: torch.Tensor,
                page_size: int, rows_out: torch.Tensor, lens_out: torch.Tensor, idx_out: torch.Tensor,
                raw: int | None = None) -> None:
    """One decode step of the pool's tables (one launch, grid ``(bs, L)``; no host sync).

    ``req_idx`` int ``[>= raw]`` the real slots' ``req_pool_idx``; ``seg_pages`` int32 ``[R, L, H, MP]``,
    ``seg_len`` int32 ``[R, L, H]`` (advanced in place for active segments), ``active`` bool ``[R, L, H]``.
    Writes ``rows_out`` int64 ``[L, bs, H]``, ``lens_out`` int32 ``[bs, L, H]`` (lengths after the step)
    and ``idx_out`` int64 ``[bs]``; slots ``raw .. bs - 1`` are padding (zeros). ``rows_out`` may be a
    slice ``[:, :bs]`` of a larger buffer (its stride in the slot axis is the buffer's).
    """
    R, L, H, MP = seg_pages.shape
    bs = idx_out.shape[0]
    raw = bs if raw is None else raw
    if bs == 0:
        return
    if not _cuda_or_interpreted(seg_len):
        raise RuntimeError("decode_step needs CUDA or TRITON_INTERPRET=1")
    if rows_out.shape != (L, bs, H) or lens_out.shape != (bs, L, H):
        raise ValueError(f"rows_out must be [{L}, {bs}, {H}] and lens_out [{bs}, {L}, {H}], got "
                         f"{tuple(rows_out.shape)} and {tuple(lens_out.shape)}")
    if not (lens_out.is_contiguous() and rows_out.stride(2) == 1 and seg_len.is_contiguous()
            and seg_pages.is_contiguous() and active.is_contiguous()):
        raise ValueError("lens_out and the tables must be contiguous, rows_out contiguous in H")
    if rows_out.dtype != torch.int64 or lens_out.dtype != torch.int32 or idx_out.dtype != torch.int64:
        raise ValueError("rows_out int64, lens_out int32, idx_out int64")
    if raw == 0:  # only padding slots: zeros
        idx_out.zero_()
        rows_out.zero_()
        lens_out.zero_()
        return
    _decode_step_kernel[(bs, L)](req_idx, seg_pages, seg_len, active.view(torch.int8), rows_out, lens_out,
                                 idx_out, raw, L, H, MP, rows_out.stride(0), rows_out.stride(1), P=page_size,
                                 BLOCK_H=max(16, 1 << max(0, (H - 1).bit_length())))
